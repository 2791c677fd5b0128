"""Wire format section of mpudp.py: header layout, seal/verify, the replay window, epochs."""

import hashlib
import struct

import pytest

import conftest  # noqa: F401  (puts the repo on sys.path)
import mpudp

KEY = bytes(range(32))


def mac(key=KEY):
    return mpudp.make_mac(key)


# -- layout ------------------------------------------------------------------


def test_overhead_is_32_bytes():
    assert mpudp.HEADER_SIZE == 16
    assert mpudp.MAC_SIZE == 16
    assert mpudp.OVERHEAD == 32
    for payload in (b"", b"x", b"y" * 1000):
        assert len(mpudp.seal(mac(), mpudp.TYPE_DATA, 0, 0, 0, 1, payload)) == len(payload) + 32


def test_header_layout_big_endian():
    type_flags = mpudp.TYPE_DATA | mpudp.FLAG_ACTIVE
    link, client_id, session, nonce = 0xA5, 0x1234, 0xDEADBEEF, 0x0102030405060708
    payload = b"payload!"
    packet = mpudp.seal(mac(), type_flags, link, client_id, session, nonce, payload)
    expected_header = (bytes([type_flags, link]) + client_id.to_bytes(2, "big")
                       + session.to_bytes(4, "big") + nonce.to_bytes(8, "big"))
    assert packet[:16] == expected_header
    assert packet[16:-16] == payload
    # PROTOCOL.md: MAC = keyed BLAKE2b-128 over header and payload.
    assert packet[-16:] == hashlib.blake2b(expected_header + payload, key=KEY, digest_size=16).digest()
    assert mpudp.parse_header(packet) == (type_flags, link, client_id, session, nonce)


def test_type_and_flag_bits_do_not_overlap():
    types = [mpudp.TYPE_DATA, mpudp.TYPE_HEARTBEAT, mpudp.TYPE_ECHO, mpudp.TYPE_HELLO, mpudp.TYPE_WELCOME]
    assert len(set(types)) == len(types)
    for t in types:
        assert t & mpudp.TYPE_MASK == t
        assert (t | mpudp.FLAG_ACTIVE) & mpudp.TYPE_MASK == t
    assert mpudp.FLAG_ACTIVE & mpudp.TYPE_MASK == 0


def test_type_numbers_as_protocol_md():
    assert (mpudp.TYPE_DATA, mpudp.TYPE_HEARTBEAT, mpudp.TYPE_ECHO, mpudp.TYPE_HELLO, mpudp.TYPE_WELCOME) == (
        1, 2, 3, 4, 5)
    assert (mpudp.TYPE_COOKIE, mpudp.TYPE_CHALLENGE, mpudp.TYPE_RESPONSE, mpudp.TYPE_PROBE,
            mpudp.TYPE_PROBE_ACK) == (6, 7, 8, 9, 10)
    assert mpudp.FLAG_ACTIVE == 0x80  # byte 0, bit 7


def test_control_packet_sizes_as_protocol_md():
    # No answer is larger than its trigger: ECHO = HEARTBEAT = 56, WELCOME = HELLO = 64,
    # PROBE_ACK = PROBE (the same size, padded; the smallest probe is 36 bytes).
    assert mpudp.OVERHEAD + mpudp.HEARTBEAT_PAYLOAD.size == mpudp.OVERHEAD + mpudp.ECHO_PAYLOAD.size == 56
    assert mpudp.OVERHEAD + mpudp.PROBE_PAYLOAD.size == 36
    assert mpudp.OVERHEAD + mpudp.HELLO_PAYLOAD.size == mpudp.OVERHEAD + mpudp.WELCOME_PAYLOAD.size == 64
    assert mpudp.MAX_DATA_PAYLOAD == 65507 - 32 == 65475


def test_seal_into_matches_seal_in_a_larger_buffer():
    payload = b"abcdef"
    buf = bytearray(200)
    buf[16:16 + len(payload)] = payload
    n = mpudp.seal_into(buf, mac(), mpudp.TYPE_ECHO, 3, 4, 5, 6, len(payload))
    assert n == len(payload) + 32
    assert bytes(buf[:n]) == mpudp.seal(mac(), mpudp.TYPE_ECHO, 3, 4, 5, 6, payload)


# -- seal / verify -------------------------------------------------------------


def test_round_trip():
    packet = mpudp.seal(mac(), mpudp.TYPE_HEARTBEAT, 1, 2, 3, 4, b"\x00\x00\x00\x01\x00\x00\x00\x00")
    assert mpudp.verify(mac(), packet, len(packet))
    assert mpudp.parse_header(packet) == (mpudp.TYPE_HEARTBEAT, 1, 2, 3, 4)


def test_verify_in_a_receive_buffer_and_memoryview():
    packet = mpudp.seal(mac(), mpudp.TYPE_DATA, 0, 0, 9, 9, b"data")
    buf = bytearray(4096)
    buf[:len(packet)] = packet
    assert mpudp.verify(mac(), buf, len(packet))
    assert mpudp.verify(mac(), memoryview(buf), len(packet))
    # Trailing garbage beyond `length` is ignored; a wrong length is not.
    buf[len(packet):len(packet) + 4] = b"junk"
    assert mpudp.verify(mac(), buf, len(packet))
    assert not mpudp.verify(mac(), buf, len(packet) + 4)


def test_verify_fails_under_another_key():
    packet = mpudp.seal(mac(), mpudp.TYPE_DATA, 0, 0, 9, 9, b"data")
    assert not mpudp.verify(mac(b"\x01" * 32), packet, len(packet))


def test_every_single_bit_flip_fails_verify():
    packet = mpudp.seal(mac(), mpudp.TYPE_DATA | mpudp.FLAG_ACTIVE, 7, 0x0102, 0xA0B0C0D0, (5 << 48) | 77,
                        b"12345678")
    assert mpudp.verify(mac(), packet, len(packet))
    failures = 0
    for i in range(len(packet) * 8):
        flipped = bytearray(packet)
        flipped[i // 8] ^= 1 << (i % 8)
        if not mpudp.verify(mac(), bytes(flipped), len(flipped)):
            failures += 1
    assert failures == len(packet) * 8


def test_truncated_packets_fail_verify_and_short_ones_do_not_parse():
    packet = mpudp.seal(mac(), mpudp.TYPE_DATA, 0, 0, 1, 1, b"0123456789")
    for k in range(len(packet)):
        assert not mpudp.verify(mac(), packet[:k], k), k
        if k < mpudp.OVERHEAD:
            with pytest.raises(mpudp.ProtocolError):
                mpudp.parse_header(packet[:k])
        else:
            assert mpudp.parse_header(packet[:k]) == mpudp.parse_header(packet)


def test_empty_payload_packet_parses():
    packet = mpudp.seal(mac(), mpudp.TYPE_DATA, 0, 0, 1, 1, b"")
    assert len(packet) == mpudp.OVERHEAD
    assert mpudp.parse_header(packet) == (mpudp.TYPE_DATA, 0, 0, 1, 1)
    assert mpudp.verify(mac(), packet, len(packet))


# -- ReplayWindow --------------------------------------------------------------


def accept(window, seq):
    """What a receiver does: check, then (MAC verified) mark.  True if accepted."""
    if not window.fresh(seq):
        return False
    window.mark(seq)
    return True


def test_replay_window_accepts_each_seq_once():
    w = mpudp.ReplayWindow()
    for seq in range(1, 5000):
        assert accept(w, seq)
        assert not accept(w, seq)
    for seq in range(4000, 5000):
        assert not w.fresh(seq)


def test_replay_window_rejects_zero():
    w = mpudp.ReplayWindow()
    assert not w.fresh(0)
    w.mark(5)
    assert not w.fresh(0)


def test_replay_window_too_old_boundary():
    size = 64
    w = mpudp.ReplayWindow(size)
    top = 1000
    assert accept(w, top)
    # Anything at or below top - size is too old to tell from a replay.
    assert not w.fresh(top - size)
    assert not w.fresh(top - size - 1)
    assert not w.fresh(1)
    # Just inside the window and never seen: accepted once.
    assert w.fresh(top - size + 1)
    assert accept(w, top - size + 1)
    assert not accept(w, top - size + 1)


def test_replay_window_default_size():
    w = mpudp.ReplayWindow()
    assert w.size == mpudp.REPLAY_WINDOW_SIZE == 2048
    accept(w, 10000)
    assert not w.fresh(10000 - 2048)
    assert w.fresh(10000 - 2047)


def test_replay_window_reordering_within_window():
    w = mpudp.ReplayWindow(64)
    order = [10, 3, 7, 1, 2, 40, 9, 8, 11, 30, 4, 6, 5, 20]
    for seq in order:
        assert accept(w, seq), seq
    for seq in order:
        assert not accept(w, seq), seq
    for seq in range(1, 41):
        assert w.fresh(seq) == (seq not in order)


def test_replay_window_large_jumps():
    w = mpudp.ReplayWindow(64)
    assert accept(w, 1)
    assert accept(w, 10 ** 6)
    assert not w.fresh(1)  # now far too old
    assert accept(w, 10 ** 6 - 1)
    assert accept(w, 10 ** 6 - 63)
    assert not w.fresh(10 ** 6 - 64)
    big = mpudp.SEQ_MASK  # the largest 48-bit sequence number
    assert accept(w, big)
    assert not accept(w, big)
    assert not w.fresh(10 ** 6)
    # Slots are reused as the window slides: an old number sharing a slot with a
    # new one is still refused (too old), the new one is fresh.
    w2 = mpudp.ReplayWindow(64)
    assert accept(w2, 5)
    assert w2.fresh(5 + 64)
    assert accept(w2, 5 + 64)
    assert not w2.fresh(5)


def test_replay_window_fresh_does_not_consume():
    w = mpudp.ReplayWindow(64)
    for _ in range(3):
        assert w.fresh(7)  # a forged packet that fails its MAC never calls mark
    assert w.top == 0
    w.mark(7)
    assert not w.fresh(7)
    # fresh() of a far-ahead number does not slide the window either.
    assert w.fresh(10 ** 9)
    assert w.fresh(8)
    assert w.fresh(6)


# -- Epoch ---------------------------------------------------------------------

SECRET = b"S" * 32
CN = b"\x12\x34" + b"c" * 14
SN = b"s" * 16


def epochs():
    return mpudp.Epoch(SECRET, CN, SN, is_client=True), mpudp.Epoch(SECRET, CN, SN, is_client=False)


def test_epoch_client_and_server_interoperate():
    client, server = epochs()
    up = mpudp.seal(client.tx_mac, mpudp.TYPE_DATA, 0, 0, 1, client.next_nonce(), b"up")
    down = mpudp.seal(server.tx_mac, mpudp.TYPE_DATA, 0, 0, 1, server.next_nonce(), b"down")
    assert mpudp.verify(server.rx_mac, up, len(up))
    assert mpudp.verify(client.rx_mac, down, len(down))
    # Not crosswise: a packet never verifies under its own direction's receive
    # key on the sending side (no reflection), nor under the other's tx key.
    assert not mpudp.verify(client.rx_mac, up, len(up))
    assert not mpudp.verify(server.tx_mac, up, len(up))
    assert not mpudp.verify(server.rx_mac, down, len(down))
    assert not mpudp.verify(client.tx_mac, down, len(down))


def test_epoch_from_other_nonces_does_not_verify():
    client, _server = epochs()
    other_server = mpudp.Epoch(SECRET, CN, b"t" * 16, is_client=False)
    up = mpudp.seal(client.tx_mac, mpudp.TYPE_DATA, 0, 0, 1, client.next_nonce(), b"up")
    assert not mpudp.verify(other_server.rx_mac, up, len(up))


def test_epoch_next_nonce_carries_tag_and_counts_from_one():
    client, server = epochs()
    assert client.tag == server.tag == 0x1234
    for expected_seq in (1, 2, 3, 4):
        nonce = client.next_nonce()
        assert nonce >> 48 == 0x1234
        assert nonce & ((1 << 48) - 1) == expected_seq
        assert nonce < 1 << 64
        # It fits the header's u64 and the tag is its first two bytes on the wire.
        assert struct.pack("!Q", nonce)[:2] == b"\x12\x34"
    # The two directions count independently.
    assert server.next_nonce() == (0x1234 << 48) | 1


def test_epoch_has_its_own_replay_window():
    client, server = epochs()
    assert isinstance(server.window, mpudp.ReplayWindow)
    assert server.window is not client.window
    assert server.window.fresh(1)


def test_replay_window_tells_a_copy_from_an_old_packet():
    """`seen`: accepted and still inside the window (a redundancy copy, counted as a
    duplicate); an old number outside the window is not `seen`, only not fresh."""
    w = mpudp.ReplayWindow(64)
    w.mark(10)
    assert w.seen(10) and not w.fresh(10)
    assert not w.seen(11)
    w.mark(100)
    assert not w.fresh(10) and not w.seen(10)  # fell out of the window: a replay, not a copy
    assert not w.seen(0)
