"""Crypto section of mpudp.py: X25519 (RFC 7748), key encoding, key derivation, MACs.

Expected values come from RFC 7748, or from PROTOCOL.md's definitions computed
here with hashlib directly, never from the code under test.
"""

import base64
import hashlib

import pytest

from conftest import keypair  # noqa: F401  (also puts the repo on sys.path)
import mpudp

P = 2 ** 255 - 19


def h(text):
    return bytes.fromhex(text)


# -- RFC 7748 section 5.2 and 6.1 --------------------------------------------

RFC_5_2_VECTORS = [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]

ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


@pytest.mark.parametrize("scalar,u,expected", RFC_5_2_VECTORS)
def test_x25519_rfc7748_vectors(scalar, u, expected):
    assert mpudp.x25519(h(scalar), h(u)).hex() == expected


def test_x25519_second_vector_masks_the_top_bit_of_u():
    # Vector 2's u ends in 0x93: its top bit is set.  RFC 7748 section 5 says
    # implementations MUST mask that bit, so the same u with it cleared gives
    # the same answer.
    scalar, u, expected = RFC_5_2_VECTORS[1]
    raw = bytearray(h(u))
    assert raw[31] & 0x80
    raw[31] &= 0x7F
    assert mpudp.x25519(h(scalar), bytes(raw)).hex() == expected


def test_x25519_iterated_rfc7748_1_and_1000():
    k = u = (9).to_bytes(32, "little")
    for i in range(1000):
        k, u = mpudp.x25519(k, u), k
        if i == 0:
            assert k.hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    # RFC 7748 section 5.2, "After 1,000 iterations".
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_public_keys_rfc7748_section_6_1():
    assert mpudp.public_key(h(ALICE_PRIVATE)).hex() == ALICE_PUBLIC
    assert mpudp.public_key(h(BOB_PRIVATE)).hex() == BOB_PUBLIC


def test_shared_secret_rfc7748_section_6_1_both_directions():
    assert mpudp.x25519(h(ALICE_PRIVATE), h(BOB_PUBLIC)).hex() == SHARED
    assert mpudp.x25519(h(BOB_PRIVATE), h(ALICE_PUBLIC)).hex() == SHARED


@pytest.mark.parametrize("private,u", [(bytes(31), bytes(32)), (bytes(32), bytes(33)), (b"", b"")])
def test_x25519_rejects_wrong_lengths(private, u):
    with pytest.raises(mpudp.ProtocolError):
        mpudp.x25519(private, u)


def test_generated_private_keys_are_clamped_and_differ():
    keys = [mpudp.generate_private_key() for _ in range(8)]
    assert len(set(keys)) == 8
    for k in keys:
        assert len(k) == 32
        assert k[0] & 7 == 0
        assert k[31] & 0x80 == 0
        assert k[31] & 0x40


# -- static_secret -------------------------------------------------------------


def _pair():
    private = mpudp.generate_private_key()
    return private, mpudp.public_key(private)


def test_static_secret_both_sides_agree():
    c_priv, c_pub = _pair()
    s_priv, s_pub = _pair()
    client_side = mpudp.static_secret(c_priv, s_pub, c_pub, s_pub)
    server_side = mpudp.static_secret(s_priv, c_pub, c_pub, s_pub)
    assert client_side == server_side
    assert len(client_side) == 32
    # It is not the raw DH output: the public keys are bound in through the KDF.
    assert client_side != mpudp.x25519(c_priv, s_pub)
    expected = hashlib.blake2b(b"mpudp v1 static" + c_pub + s_pub, key=mpudp.x25519(c_priv, s_pub),
                               digest_size=32).digest()
    assert client_side == expected


def test_static_secret_binds_the_public_keys_in_order():
    c_priv, c_pub = _pair()
    s_priv, s_pub = _pair()
    assert mpudp.static_secret(c_priv, s_pub, c_pub, s_pub) != mpudp.static_secret(c_priv, s_pub, s_pub, c_pub)


def test_static_secret_differs_between_pairs():
    s_priv, s_pub = _pair()
    secrets = set()
    for _ in range(4):
        c_priv, c_pub = _pair()
        secrets.add(mpudp.static_secret(c_priv, s_pub, c_pub, s_pub))
    c_priv, c_pub = _pair()
    s2_priv, s2_pub = _pair()
    secrets.add(mpudp.static_secret(c_priv, s_pub, c_pub, s_pub))
    secrets.add(mpudp.static_secret(c_priv, s2_pub, c_pub, s2_pub))
    assert len(secrets) == 6


LOW_ORDER_U = [
    0,
    1,
    P - 1,
    P,  # non-canonical 0
    P + 1,  # non-canonical 1
    # The two points of order 8 (libsodium's blocklist).
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
]


@pytest.mark.parametrize("u", LOW_ORDER_U, ids=["0", "1", "p-1", "p", "p+1", "order8a", "order8b"])
def test_static_secret_rejects_low_order_public_keys(u):
    c_priv, c_pub = _pair()
    bad = u.to_bytes(32, "little")
    with pytest.raises(mpudp.ProtocolError):
        mpudp.static_secret(c_priv, bad, c_pub, bad)


# -- key encoding ----------------------------------------------------------------


def test_encode_decode_round_trip_and_whitespace():
    raw = mpudp.generate_private_key()
    text = mpudp.encode_key(raw)
    assert text == base64.b64encode(raw).decode("ascii")
    assert mpudp.decode_key(text) == raw
    assert mpudp.decode_key("  %s\n" % text) == raw  # pasted with a newline


@pytest.mark.parametrize("text", [
    "not base64 at all!!",
    "AAAA AAAA",
    "é" * 44,
    base64.b64encode(bytes(32)).decode().rstrip("="),  # padding missing
    base64.b64encode(bytes(32)).decode()[:-2] + "*=",
])
def test_decode_key_rejects_bad_base64(text):
    with pytest.raises(mpudp.ProtocolError):
        mpudp.decode_key(text)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_decode_key_rejects_wrong_length(length):
    with pytest.raises(mpudp.ProtocolError) as info:
        mpudp.decode_key(base64.b64encode(b"\x01" * length).decode())
    assert str(length) in str(info.value)


def test_conftest_keypair_is_consistent():
    private, public = keypair()
    assert mpudp.public_key(mpudp.decode_key(private)) == mpudp.decode_key(public)


# -- epoch keys and MACs -------------------------------------------------------


def kdf(key, label):
    """PROTOCOL.md: KDF(key, label) = BLAKE2b(label, key=key, digest_size=32)."""
    return hashlib.blake2b(label, key=key, digest_size=32).digest()


def mac_of(key, data):
    """PROTOCOL.md: the MAC is keyed BLAKE2b with a 16-byte digest."""
    return hashlib.blake2b(data, key=key, digest_size=16).digest()


def test_kdf_as_protocol_md():
    assert mpudp.kdf(b"k" * 32, b"label") == kdf(b"k" * 32, b"label")


def test_epoch_keys_as_protocol_md():
    static = bytes(range(32))
    nc, ns = bytes(range(16)), bytes(range(16, 32))
    master = kdf(static, b"epoch" + nc + ns)
    assert mpudp.epoch_keys(static, nc, ns) == (kdf(master, b"data c2s"), kdf(master, b"data s2c"))


def test_static_keys_as_protocol_md():
    static = b"\x42" * 32
    keys = mpudp.StaticKeys(static)
    hello, welcome = keys.hello_mac.copy(), keys.welcome_mac.copy()
    hello.update(b"packet")
    welcome.update(b"packet")
    assert hello.digest() == mac_of(kdf(static, b"hello c2s"), b"packet")
    assert welcome.digest() == mac_of(kdf(static, b"welcome s2c"), b"packet")


def test_epoch_keys_distinct_directions_and_depend_on_both_nonces():
    secret = bytes(range(32))
    cn, sn = b"\x01" * 16, b"\x02" * 16
    c2s, s2c = mpudp.epoch_keys(secret, cn, sn)
    assert len(c2s) == len(s2c) == 32
    assert c2s != s2c
    assert mpudp.epoch_keys(secret, cn, sn) == (c2s, s2c)  # deterministic
    other_cn = mpudp.epoch_keys(secret, b"\x03" * 16, sn)
    other_sn = mpudp.epoch_keys(secret, cn, b"\x03" * 16)
    other_secret = mpudp.epoch_keys(bytes(32), cn, sn)
    keys = {c2s, s2c} | set(other_cn) | set(other_sn) | set(other_secret)
    assert len(keys) == 8


def test_epoch_tag_is_the_first_two_bytes_big_endian():
    assert mpudp.epoch_tag(b"\xab\xcd" + bytes(14)) == 0xABCD
    assert mpudp.epoch_tag(b"\x00\x01" + b"\xff" * 14) == 1


def test_make_mac_is_keyed_blake2b_128():
    key = b"k" * 32
    mac = mpudp.make_mac(key)
    m = mac.copy()
    m.update(b"hello")
    assert m.digest() == mac_of(key, b"hello")
    assert len(m.digest()) == mpudp.MAC_SIZE == 16


def test_make_mac_copies_are_independent():
    key = b"\x07" * 32
    mac = mpudp.make_mac(key)
    empty = mac_of(key, b"")
    first = mac.copy()
    first.update(b"first packet")
    second = mac.copy()
    second.update(b"second")
    # Using a copy leaves the template untouched, and copies do not see each other.
    assert mac.digest() == empty
    assert first.digest() == mac_of(key, b"first packet")
    assert second.digest() == mac_of(key, b"second")
    assert mpudp.make_mac(b"\x08" * 32).digest() != empty


def test_static_keys_hello_and_welcome_macs_differ():
    keys = mpudp.StaticKeys(b"s" * 32)
    a, b = keys.hello_mac.copy(), keys.welcome_mac.copy()
    a.update(b"x")
    b.update(b"x")
    assert a.digest() != b.digest()
