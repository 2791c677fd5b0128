"""Hostile network, forged and random packets: thousands of seeded random, truncated,
oversized, bit-flipped and header-mutated packets fed to a real Server and Client in this
process (conftest.InProcess on a fake clock); every one is dropped and counted, nothing
escapes into the reactor's guard, and a legitimate round trip still works.  Valid MACs
around nonsense are handled too.  The pure decoders and the replay window are fed random
input.

Fuzz knobs (environment): MPUDP_FUZZ_CASES (default 10000, well under a second) runs more,
MPUDP_FUZZ_SEED replays the seed a failure message names.
"""

import collections
import os
import random
import time
import tracemalloc

import pytest

import mpudp
from helpers import FUZZ_CASES, FUZZ_SEED, drain, header, kind, random_bytes, reporter, udp_socket

DATA, HEARTBEAT, ECHO, HELLO, WELCOME = (mpudp.TYPE_DATA, mpudp.TYPE_HEARTBEAT, mpudp.TYPE_ECHO,
                                         mpudp.TYPE_HELLO, mpudp.TYPE_WELCOME)

# Counters that mean "dropped before anything moved" (PROTOCOL.md, "Receiving a packet").
SERVER_PRE_AUTH_DROPS = {"short", "unknown_client", "stale_epoch", "replay", "duplicate", "auth", "hello_limit"}
CLIENT_PRE_AUTH_DROPS = {"short", "bad_header", "stale_welcome", "stale_epoch", "replay", "duplicate", "auth"}

report = reporter("hostile")


def mutate_header(rng, packet, own_tag, client_id_choices):
    """`packet` with some header fields replaced by random or edge-case values."""
    type_flags, link, client_id, session, nonce = header(packet)
    if rng.random() < 0.5:
        type_flags = rng.randrange(256)
    if rng.random() < 0.3:
        link = rng.choice((0, 1, 255, rng.randrange(256)))
    if rng.random() < 0.4:
        client_id = rng.choice(client_id_choices + (0xFFFF, rng.randrange(1 << 16)))
    if rng.random() < 0.3:
        session = rng.choice((0, 0xFFFFFFFF, rng.randrange(1 << 32)))
    if rng.random() < 0.6:
        seq = rng.choice((0, 1, mpudp.SEQ_MASK, rng.randrange(1 << 48)))
        tag = rng.choice((own_tag, own_tag, rng.randrange(1 << 16)))
        nonce = (tag << mpudp.SEQ_BITS) | seq
    mutated = bytearray(packet)
    mpudp.HEADER.pack_into(mutated, 0, type_flags, link, client_id, session, nonce)
    if bytes(mutated) == packet:
        mutated[-1] ^= 1  # never a valid packet
    return bytes(mutated)


def fuzz_packet(rng, templates, own_tag, client_ids):
    """One hostile datagram: (what, bytes).  No template is ever sent unmodified."""
    template = rng.choice(templates)
    roll = rng.random()
    if roll < 0.15:
        return "garbage", random_bytes(rng, rng.choice((rng.randrange(mpudp.OVERHEAD), rng.randrange(2000))))
    if roll < 0.3:
        return "truncated", template[:rng.randrange(len(template))]
    if roll < 0.33:
        n = rng.randint(60000, mpudp.MAX_UDP_PAYLOAD)
        body = bytearray(random_bytes(rng, n))
        if rng.random() < 0.5:  # a plausible header, so the MAC of a huge packet is computed
            mpudp.HEADER.pack_into(body, 0, DATA | mpudp.FLAG_ACTIVE, 0, client_ids[0], 1,
                                   (own_tag << mpudp.SEQ_BITS) | rng.randrange(1, 1 << 47))
        return "oversized", bytes(body)
    if roll < 0.6:
        flipped = bytearray(template)
        for _ in range(rng.randint(1, 8)):
            bit = rng.randrange(len(flipped) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
        if bytes(flipped) == template:
            flipped[0] ^= 0x40
        return "bitflip", bytes(flipped)
    if roll < 0.9:
        return "header", mutate_header(rng, template, own_tag, client_ids)
    return "extended", template + random_bytes(rng, rng.randint(1, 64))


def build_templates(r, rng):
    """Packets that would be accepted if sent as they are: (to the server, to the client)."""
    s_epoch = r.peer.epoch
    static = r.client.static
    seq = [1 << 40]

    def nonce():
        seq[0] += 1
        return s_epoch.nonce_base | seq[0]

    c2s, s2c = [], []
    for i in range(8):
        payload = random_bytes(rng, rng.randrange(1, 300))
        c2s.append(mpudp.seal(s_epoch.rx_mac, DATA | mpudp.FLAG_ACTIVE, 0, 0, 1 + i, nonce(), payload))
        c2s.append(mpudp.seal(s_epoch.rx_mac, HEARTBEAT | mpudp.FLAG_ACTIVE, 0, 0, 0, nonce(),
                              mpudp.HEARTBEAT_PAYLOAD.pack(i + 1, 0, 0, 0, 0, 0, 0)))
        client_nonce = os.urandom(16)
        c2s.append(mpudp.seal(static.hello_mac, HELLO, 0, 0, 0, mpudp.handshake_nonce(mpudp.epoch_tag(client_nonce)),
                              mpudp.HELLO_PAYLOAD.pack(client_nonce, bytes(16))))
        s2c.append(mpudp.seal(s_epoch.tx_mac, DATA, 0, 0, 1 + i, nonce(), payload))
        s2c.append(mpudp.seal(s_epoch.tx_mac, ECHO, 0, 0, 0, nonce(), mpudp.ECHO_PAYLOAD.pack(i + 1, 1, 0, 0, 0, 0)))
        s2c.append(mpudp.seal(static.welcome_mac, WELCOME, 0, 0, 0, 0,
                              mpudp.WELCOME_PAYLOAD.pack(os.urandom(16), os.urandom(16))))
    return c2s, s2c


def delta(after, before):
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


# ============================================================================
# A real Server and Client in this process
# ============================================================================


def test_fuzz_server_and_client_in_process(rig):
    r = rig()
    seed = FUZZ_SEED
    rng = random.Random(seed)
    where = "fuzz seed %d (MPUDP_FUZZ_SEED=%d replays it)" % (seed, seed)
    assert r.round_trip(b"before fuzz")
    c2s, s2c = build_templates(r, rng)
    own_tag = r.peer.epoch.tag
    s_epoch, c_epoch = r.peer.epoch, r.client.epoch
    return_path = (r.peer.return_path.addr, r.peer.return_path.link)
    server_before, client_before = dict(r.server.counters), dict(r.client.counters)
    upstream_before = len(r.upstream_payloads())
    fuzz = udp_socket(blocking=False)
    sent = {"server": 0, "client": 0}
    kinds = collections.Counter()
    started = time.monotonic()
    base = r.drops()

    def accounted():
        server_drops, client_drops = r.drops()
        return server_drops - base[0] == sent["server"] and client_drops - base[1] == sent["client"]

    settled = True
    for _ in range(FUZZ_CASES):
        to_server = rng.random() < 0.5
        what, packet = fuzz_packet(rng, c2s if to_server else s2c, own_tag, (0, 1) if to_server else (0,))
        kinds[what] += 1
        fuzz.sendto(packet, r.server_addr if to_server else r.link_addr)
        sent["server" if to_server else "client"] += 1
        # The clock stands still: no timer runs, so no legitimate packet is sent meanwhile.
        if not r.settle(accounted, timeout=5):
            settled = False
            break
    elapsed = time.monotonic() - started
    server_drops, client_drops = delta(r.server.counters, server_before), delta(r.client.counters, client_before)
    report("fuzz: %d cases in %.2fs (%s); server %s; client %s; %s" % (
        FUZZ_CASES, elapsed, dict(kinds), server_drops, client_drops, where))
    assert r.reactor.errors["callback"] == 0, "%s: an exception escaped:\n%s" % (where, r.log_text()[-2000:])
    assert settled, "%s: sent %s, counted server %s client %s" % (where, sent, server_drops, client_drops)
    assert set(server_drops) <= SERVER_PRE_AUTH_DROPS, where
    assert set(client_drops) <= CLIENT_PRE_AUTH_DROPS, where
    assert len(r.upstream_payloads()) == upstream_before, "%s: fuzz reached the upstream" % where
    assert drain(r.app) == [], "%s: fuzz reached the application" % where
    assert drain(fuzz) == [], "%s: a fuzz packet was answered" % where
    assert r.peer.epoch is s_epoch and r.client.epoch is c_epoch and not r.peer.pending, where
    assert (r.peer.return_path.addr, r.peer.return_path.link) == return_path, "%s: the return path moved" % where
    assert r.round_trip(b"after fuzz"), where
    fuzz.close()


def test_fuzz_authenticated_nonsense_in_process(rig):
    """Valid MACs around nonsense (odd types, lengths, links, sessions): handled, never a crash."""
    r = rig()
    seed = FUZZ_SEED ^ 0x5A5A
    rng = random.Random(seed)
    where = "fuzz seed %d (MPUDP_FUZZ_SEED=%d replays it)" % (seed, FUZZ_SEED)
    assert r.round_trip(b"before")
    # Sealed with each side's own send counter, so later legitimate packets stay in the windows.
    c2s_epoch, s2c_epoch = r.client.epoch, r.peer.epoch
    sessions = set(r.client.sessions_by_id)
    fuzz = udp_socket(blocking=False)
    upstream_before = len(r.upstream_payloads())
    probe_sizes = []
    cases = max(200, FUZZ_CASES // 4)
    for _ in range(cases):
        payload_len = rng.choice((0, 1, 7, 8, 9, 31, 32, 33, rng.randrange(1500)))
        if rng.random() < 0.5:  # to the server: anything but DATA (which would be forwarded, legitimately)
            packet_kind = rng.choice((0, HEARTBEAT, ECHO, HELLO, WELCOME, 6, 9, 15))
            link = rng.randrange(256)
            if packet_kind == HEARTBEAT and rng.random() < 0.5:
                # A well-formed heartbeat; its seq stays near the link's last one (a huge gap is
                # test_authenticated_heartbeat_with_a_huge_seq_gap_is_cheap's business).
                last = r.peer.links[link].hb_last if link in r.peer.links else 1000
                payload = mpudp.HEARTBEAT_PAYLOAD.pack(max(1, last + rng.randint(-40, 40)), rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(32))
            else:
                if packet_kind == HEARTBEAT and payload_len == mpudp.HEARTBEAT_PAYLOAD.size:
                    payload_len += 1
                payload = random_bytes(rng, payload_len)
            packet = mpudp.seal(c2s_epoch.tx_mac, packet_kind, link, 0, rng.getrandbits(32),
                                c2s_epoch.next_nonce(), payload)
            if packet_kind == mpudp.TYPE_PROBE and len(packet) >= mpudp.OVERHEAD + mpudp.PROBE_PAYLOAD.size:
                probe_sizes.append(len(packet))  # answered: a PROBE_ACK of the same size
            fuzz.sendto(packet, r.server_addr)
        else:
            packet_kind = rng.choice((0, DATA, HEARTBEAT, ECHO, HELLO, WELCOME, 7, mpudp.TYPE_PROBE_ACK, 15))
            session = rng.getrandbits(32)
            while session in sessions:
                session = rng.getrandbits(32)
            if packet_kind == ECHO and rng.random() < 0.5:
                payload = mpudp.ECHO_PAYLOAD.pack(rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(16))
            else:
                payload = random_bytes(rng, payload_len)
            packet = mpudp.seal(s2c_epoch.tx_mac, packet_kind, 0, 0, session, s2c_epoch.next_nonce(), payload)
            fuzz.sendto(packet, r.link_addr)
        r.pump()
    quiet_until = time.monotonic() + 0.2
    while time.monotonic() < quiet_until:  # the last ones are read
        r.pump(0.01)
    assert r.reactor.errors["callback"] == 0, "%s:\n%s" % (where, r.log_text()[-2000:])
    assert len(r.upstream_payloads()) == upstream_before, where
    assert drain(r.app) == [], where
    answers = drain(fuzz)
    assert all(kind(data) == ECHO and len(data) == mpudp.OVERHEAD + mpudp.ECHO_PAYLOAD.size
               for data, _ in answers if kind(data) != mpudp.TYPE_PROBE_ACK), where
    assert sorted(len(data) for data, _ in answers if kind(data) == mpudp.TYPE_PROBE_ACK) == sorted(probe_sizes), where
    assert r.round_trip(b"after"), where
    fuzz.close()


# ============================================================================
# Pure functions
# ============================================================================


LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2 ** 255 - 19 - 1).to_bytes(32, "little"),
    (2 ** 255 - 19).to_bytes(32, "little"),
    (2 ** 255 - 19 + 1).to_bytes(32, "little"),
]


def test_fuzz_pure_decoders():
    seed = FUZZ_SEED ^ 0xD0D0
    rng = random.Random(seed)
    where = "seed %d (MPUDP_FUZZ_SEED=%d replays it)" % (seed, FUZZ_SEED)
    mac = mpudp.make_mac(random_bytes(rng, 32))
    for _ in range(FUZZ_CASES):
        data = random_bytes(rng, rng.randrange(80))
        try:
            fields = mpudp.parse_header(data)
        except mpudp.ProtocolError:
            assert len(data) < mpudp.OVERHEAD, where
        else:
            assert len(data) >= mpudp.OVERHEAD and len(fields) == 5, where
            assert mpudp.HEADER.pack(*fields) == data[:mpudp.HEADER_SIZE], where
        as_view = rng.random() < 0.5
        assert mpudp.verify(mac, memoryview(bytearray(data)) if as_view else data,
                            rng.randint(0, len(data))) is False, where
        # The fixed-size payloads the receive paths unpack after their length checks.
        if len(data) >= mpudp.HEADER_SIZE + 32:
            mpudp.HELLO_PAYLOAD.unpack_from(data, mpudp.HEADER_SIZE)
            mpudp.ECHO_PAYLOAD.unpack_from(data, mpudp.HEADER_SIZE)
        text = rng.choice((
            data.decode("latin-1"),
            random_bytes(rng, rng.randrange(48)).hex(),
            mpudp.encode_key(random_bytes(rng, rng.choice((31, 32, 33)))),
            mpudp.encode_key(random_bytes(rng, 32))[:-1] + rng.choice("=*-A \n"),
        ))
        try:
            assert len(mpudp.decode_key(text)) == 32, where
        except mpudp.ProtocolError:
            pass
    for point in LOW_ORDER_POINTS:  # never a usable secret from a degenerate public key
        with pytest.raises(mpudp.ProtocolError):
            mpudp.static_secret(mpudp.generate_private_key(), point, point, point)


def test_replay_window_matches_a_model():
    seed = FUZZ_SEED ^ 0x77
    rng = random.Random(seed)
    for size in (4, 64, mpudp.REPLAY_WINDOW_SIZE):
        window, accepted, top = mpudp.ReplayWindow(size), set(), 0
        recent = collections.deque(maxlen=64)
        for _ in range(FUZZ_CASES):
            roll = rng.random()
            if roll < 0.4:
                seq = top + rng.randint(-2 * size, 3)
            elif roll < 0.6 and recent:
                seq = rng.choice(recent)
            elif roll < 0.7:
                seq = rng.choice((0, 1, top - size, top - size + 1, mpudp.SEQ_MASK))
            else:
                seq = top + rng.randint(1, 5 * size)
            seq = min(max(seq, 0), mpudp.SEQ_MASK)
            expected = seq != 0 and seq + size > top and seq not in accepted
            assert window.fresh(seq) == expected, "seed %d size %d seq %d top %d" % (seed, size, seq, top)
            if expected and rng.random() < 0.8:
                window.mark(seq)
                accepted.add(seq)
                recent.append(seq)
                top = max(top, seq)


# ============================================================================
# Regressions: bugs these tests found, fixed in mpudp.py since
# ============================================================================


def test_authenticated_heartbeat_with_a_huge_seq_gap_is_cheap(rig):
    """Server.on_heartbeat (then Server._echo) once shifted the heartbeat bitmap by (hb_seq - last), up to 2**31 bits: one
    40-byte heartbeat from an authenticated client allocated integers of up to 256 MB."""
    r = rig()
    epoch = r.peer.epoch
    last = r.peer.links[0].hb_last
    sock = udp_socket(blocking=False)
    packet = mpudp.seal(epoch.rx_mac, HEARTBEAT, 0, 0, 0, epoch.nonce_base | (epoch.window.top + 100),
                        mpudp.HEARTBEAT_PAYLOAD.pack(last + (1 << 26), 0, 0, 0, 0, 0, 0))  # 2**31 - 1 is allowed too
    sock.sendto(packet, r.server_addr)
    echoes = []
    tracemalloc.start()
    try:
        echoed = r.settle(lambda: echoes.extend(drain(sock)) or echoes)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert echoed, "the heartbeat was not echoed"
    assert peak < 1 << 20, "one heartbeat cost %.1f MB" % (peak / 1e6)
    sock.close()
