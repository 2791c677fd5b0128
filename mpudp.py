#!/usr/bin/env python3
"""mpudp: a multipath UDP relay in one file, standard library only.

A device behind NAT is often reachable through several addresses (several frp
servers, several uplinks).  The mpudp client measures every such *link* with
authenticated heartbeats, carries a local application's UDP traffic on the best
one, fails over when it dies and switches back with hysteresis.  The mpudp
server forwards that traffic to the *upstream* and sends the replies back over
the link the client marks active::

    local app --UDP-- client ==== link 0 (frp A / WAN 1) ==== server --UDP-- upstream
                             ==== link 1 (frp B / WAN 2) ====
                             ==== link N                 ====

Usage::

    python3 mpudp.py -config=config.json     # run as the config's "mode" says
    python3 mpudp.py -config=config.json --check
    python3 mpudp.py --demo                  # server, client, two links and an echo, in one process
    python3 keygen.py                        # a new X25519 key pair

Every packet between client and server has this shape (PROTOCOL.md has the rest)::

     0        1        2        4                 8                        16
    +--------+--------+--------+-----------------+------------------------+
    |flags|ty| link   | client | session id      | nonce: epoch(16)|seq(48)|
    +--------+--------+--------+-----------------+------------------------+
    | payload (0..65475 bytes)                              | MAC (16)    |
    +-------------------------------------------------------+-------------+
    MAC = keyed BLAKE2b-128 over header and payload, one key per direction.

Glossary (how things are named here):

- *link*: one path from the client to the server, i.e. one ``remote_addr`` in
  the client's config, with its own socket and measurements.
- *active*: the link the client currently sends data on; the server sends
  replies back on the link whose packets carry the ACTIVE flag.
- *route*: the links data goes out on now (the active one first, then the
  links that carry copies with redundancy).  Steering decides it; the data
  path only reads it.
- *data path* and *control*: the drains that carry packets, and everything
  that decides (handshake, heartbeats, steering, reload).  Control runs
  between drains, never inside one (Reactor.call_soon).
- *session*: one local application (its source ip and port) behind the
  client; on the server, the upstream socket that stands for it (like NAT).
- *client id*: the index of a client's public key in the server's
  ``client_public_keys``; it picks the keys that must authenticate a packet.
- *epoch*: the keys and counters agreed by one HELLO/COOKIE/WELCOME handshake.  A
  restarted client or server starts a new epoch, so old packets never verify.
- *upstream*: where the server forwards a client's traffic.
"""

import argparse
import base64
import errno
import heapq
import json
import math
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from array import array
from collections import deque
from difflib import get_close_matches
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# BLAKE2 and the constant-time compare come from CPython's own C modules:
# `hashlib` and `hmac` would also load OpenSSL (3.7 MB of RSS here) for nothing.
try:
    from _blake2 import blake2b
    from _operator import _compare_digest as compare_digest
except ImportError:  # another Python implementation
    from hashlib import blake2b  # type: ignore[no-redef]
    from hmac import compare_digest  # type: ignore[no-redef]

__version__ = "0.1.0"

# ============================================================================
# Constants
# ============================================================================

# Wire format (PROTOCOL.md).
HEADER = struct.Struct("!BBHIQ")  # flags|type, link, client id, session id, nonce
HEADER_SIZE = HEADER.size  # 16
MAC_SIZE = 16
OVERHEAD = HEADER_SIZE + MAC_SIZE  # 32 bytes per packet, as WireGuard's
MAX_UDP_PAYLOAD = 65507  # the largest IPv4 UDP datagram
MAX_DATA_PAYLOAD = MAX_UDP_PAYLOAD - OVERHEAD
RECV_BUFFER_SIZE = 65536 + OVERHEAD  # larger than any datagram: never truncates
# The largest application datagram that crosses a 1500-byte path unfragmented
# once mpudp's 32 bytes and the IP and UDP headers are added: 1440 over IPv4,
# 1420 over IPv6 (WireGuard inside: MTU 1408 or 1388).
COMMON_PATH_MTU = 1500
FITS_1500_IPV4 = COMMON_PATH_MTU - 20 - 8 - OVERHEAD
FITS_1500_IPV6 = COMMON_PATH_MTU - 40 - 8 - OVERHEAD

TYPE_DATA = 1
TYPE_HEARTBEAT = 2
TYPE_ECHO = 3
TYPE_HELLO = 4
TYPE_WELCOME = 5
TYPE_COOKIE = 6
TYPE_CHALLENGE = 7  # server -> client: prove you receive at the address this came to
TYPE_RESPONSE = 8  # client -> server: the challenge's token, from that address
TYPE_PROBE = 9  # client -> server: padded to the datagram size it tests (path MTU)
TYPE_PROBE_ACK = 10  # server -> client: the probe's id, padded to the same size
TYPE_MASK = 0x0F
FLAG_ACTIVE = 0x80  # "the server should send replies back over this link"
COPIES_SHIFT = 4  # bits 4-6 of the first byte, on ACTIVE packets: copies sent downstream, minus 1
COPIES_MASK = 0x70
MAX_REDUNDANCY = 8  # what those three bits can say

SEQ_BITS = 48
SEQ_MASK = (1 << SEQ_BITS) - 1
SEQ_REKEY_AT = SEQ_MASK - (1 << 32)  # start a new epoch long before the counter wraps
NONCE_SIZE = 16
HELLO_PAYLOAD = struct.Struct("!16s16s")  # client nonce, cookie (zeros until the server sent one)
WELCOME_PAYLOAD = struct.Struct("!16s16s")  # client nonce, server nonce
COOKIE_PAYLOAD = struct.Struct("!16s16s")  # client nonce, cookie
# What a HEARTBEAT says: its seq on this link, reserved, and the client's counts
# of DATA it sent and received on this link; an ECHO: the seq, a bitmap of the
# last 32 heartbeats received, the server's counts of the client's DATA
# received on this link and of DATA sent to the client on it (DataLiveness), and
# the largest reply payload it sent lately (which links are large enough).
# With aggregate, a HEARTBEAT on a carrying link also says how to spread the
# replies: that link's estimated rate to the client (kbit/s; 0: do not spread),
# its one-way delay (units of 0.1 ms) and how long to hold an early packet (ms).
# Every HEARTBEAT carries the client's clock (ms), and every ECHO how much longer
# than its least lately this link's heartbeat took one way (ms; clocks need not
# agree): a queue towards the server, told from one towards the client.
# Both are 56 bytes: an echo is never larger than the heartbeat it answers.
HEARTBEAT_PAYLOAD = struct.Struct("!IIIIHHI")
ECHO_PAYLOAD = struct.Struct("!IIIIHH4x")
PATH_TOKEN = struct.Struct("!Q")  # CHALLENGE and RESPONSE payload
PROBE_PAYLOAD = struct.Struct("!I")  # PROBE and PROBE_ACK: the probe's id, then zeros up to its size
OWD_UNIT_S = 0.0001  # a heartbeat's one-way delay field
COUNT_MASK = 0xFFFFFFFF  # counts on the wire wrap at 32 bits
# The wire protocol's version, in the sequence-number bits of the nonce of
# HELLO, WELCOME and COOKIE (0 there in version 1).  Both ends must agree.
PROTOCOL_VERSION = 3

REPLAY_WINDOW_SIZE = 2048  # packets; reordering deeper than this is dropped
PENDING_EPOCHS_PER_CLIENT = 4
HELLOS_PER_SWEEP = 8  # per client: new pending epochs between two server sweeps
SEEN_HELLOS_PER_CLIENT = 1024  # HELLO nonces remembered, so a replayed one costs nothing
COOKIE_PERIOD_S = 30.0  # a cookie is good in the period it was made and the next
# COOKIE answers cost nothing to make, but a spoofed HELLO turns them on a victim:
# per source prefix (an frp server's address) and in all, a burst then a rate.
COOKIES_PER_PREFIX_PER_S, COOKIE_BURST_PER_PREFIX = 16.0, 32
COOKIES_PER_S, COOKIE_BURST = 1000.0, 1000

# Link measurement and policy (the essay is above LinkHealth).
INITIAL_HEARTBEAT_TIMEOUT_S = 1.0  # before the first RTT sample, as RFC 6298
HEARTBEAT_TIMEOUT_FLOOR_S = 0.1
HEARTBEAT_TIMEOUT_CEILING_S = 2.0  # the original's fixed timeout
LOSS_WINDOW_HEARTBEATS = 50  # one loss is 2%: 10 points at the default weight, < switch_threshold
RECOVERY_ANSWERS = 3  # consecutive answers before a recovered link is a regular candidate
MIN_DWELL_HEARTBEATS = 5  # no regular switch sooner than this after the last one
MIN_DWELL_FLOOR_S = 2.0
THROUGHPUT_WINDOW_S = 3.0
HELLO_TRIES_PER_NONCE = 4  # HELLO is repeated every heartbeat interval until a WELCOME
HELLO_TRIES_BEFORE_WARNING = 10
HELLO_FIRST_RETRY_S = 0.05  # doubling up to the heartbeat interval
NEVER_ANSWERED_HEARTBEATS = 10  # a link silent since start says so once, after this many
AUTO_REDUNDANCY_HEARTBEATS = 10  # "auto" duplicates while the active link missed one of its last 10
DATA_LOST_PACKETS = 16  # DATA sent one way on a link in a row, none of it arrived: it carries no data
DATA_RETRY_FIRST_S = 10.0  # an unfit link is tried again after this, doubling up to the ceiling
DATA_RETRY_CEILING_S = 300.0
# Path MTU (PathMtuSearch's essay).  Sizes are whole mpudp datagrams (UDP payload).
PMTU_BASE = 1280  # IP bytes: IPv6's minimum MTU, RFC 8899's BASE_PLPMTU; assumed to pass
PMTU_PROBE_TRIES = 3  # a size is too large after this many of its probes are lost (MAX_PROBES)
PMTU_GRANULARITY = 8  # the search ends when what passed and what did not are this close
PMTU_RAISE_S = 600.0  # a finished search tries larger sizes again after this (PMTU_RAISE_TIMER)
LARGE_DATA_MEMORY_S = 15.0  # the largest recent datagram is remembered for 15-30 s
IPV4_UDP_HEADERS, IPV6_UDP_HEADERS = 20 + 8, 40 + 8
# Linux's numbers, which the socket module does not name: DF set and no local
# fragmentation for one probe (IP_PMTUDISC_PROBE), and the route's MTU.
IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, PMTUDISC_PROBE = 10, 23, 3
IP_MTU, IPV6_MTU = 14, 24
# Aggregation (LinkRate's and ReorderBuffer's essays).
AGG_INITIAL_RATE = 125000.0  # bytes/s (1 Mbit/s) before a link has been measured
AGG_MIN_RATE = 12500.0  # bytes/s the carriers are taken to deliver at the least (100 kbit/s each)
AGG_LOSS_SIGNAL = 0.02  # data lost on a link in one heartbeat interval that says it is full
AGG_QUEUE_MARGIN_S = 0.003  # a queue (a delay) this much above the least of the carriers' gives share
AGG_STEP = 0.1  # the least share a full link, or a slower one while none is full, gives up per interval
AGG_DRAIN_S = 1.0  # a full link is sent less than it delivered while its queue drains: 10 ms above the others, 1% less
AGG_MAX_DRAIN = 0.1  # no more: when every link is full, moving traffic drains nothing, and a swing loses more
AGG_MIN_SHARE = 0.02  # every carrier keeps a little traffic, to be measured by
AGG_HEADROOM = 1.25  # the Spreader's rates: what the carriers delivered together, and this much more
SPREAD_AHEAD_S = 1.0  # the Spreader's virtual queues never run further ahead of now than this
MIN_RTT_MEMORY_S = 10.0  # the least RTT is of the last 10-20 s: a path that moved is seen anew
REORDER_HOLD_FLOOR_S = 0.010
REORDER_HOLD_CAP_S = 0.25  # an early datagram waits for the ones before it at most this long
DNS_RETRY_FLOOR_S = 1.0
DNS_RETRY_CEILING_S = 60.0
SCORE_FILE_MIN_INTERVAL_S = 1.0

# Housekeeping.
SWEEP_INTERVAL_CEILING_S = 5.0
DROP_SUMMARY_INTERVAL_S = 60.0
VERSION_LOG_INTERVAL_S = 60.0  # "the other end speaks another protocol version"
ERROR_LOG_INTERVAL_S = 10.0
PATH_LINE_INTERVAL_S = 10.0  # "replies now go by ...": at most PATH_LINES_PER_INTERVAL lines per client
PATH_LINES_PER_INTERVAL = 5
UNVALIDATED_BYTES_FACTOR = 3  # replies to an address not yet validated: 3x what came from it (RFC 9000 8.1)
MAX_UNVALIDATED_PATHS = 8  # per client, oldest forgotten first
MAX_VALIDATED_PATHS = 64
CHALLENGES_PER_ADDRESS_PER_S, CHALLENGE_BURST = 1.0, 2  # a lost challenge is sent again, at most this often
SOCKET_BUFFER_BYTES = 1 << 20
# File descriptors the server keeps free of sessions: stdio, the listen and
# signal sockets, the resolver's socketpair and look-ups, the status, metrics
# and config files, syslog.  Each session holds one (its upstream socket).
RESERVED_FDS = 64


# ============================================================================
# Errors
# ============================================================================


class MpudpError(Exception):
    """Base of mpudp's own errors; main() turns them into one line and an exit status."""


class ConfigError(MpudpError):
    """The configuration is unusable; the message starts with the key path."""


class ProtocolError(MpudpError):
    """A key or packet that breaks the protocol's rules."""


# ============================================================================
# Logging: a few lines on stderr or syslog (python3-light has no `logging`)
# ============================================================================


class Log:
    """Timestamped, levelled lines; `every` rate-limits a repeated message."""

    LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40}

    def __init__(self, stream=None, debug: bool = False, target: str = "stderr",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.threshold = self.LEVELS["debug" if debug else "info"]
        self.clock = clock
        self._buckets = {}  # type: Dict[str, Tuple[float, float]]  # key -> (lines allowed, at)
        self._syslog = None
        if target == "syslog":
            import syslog  # only routers that ask for it need the module

            syslog.openlog("mpudp", syslog.LOG_PID, syslog.LOG_DAEMON)
            self._syslog = syslog

    @property
    def debug_enabled(self) -> bool:
        return self.threshold <= self.LEVELS["debug"]

    def set_debug(self, debug: bool) -> None:
        self.threshold = self.LEVELS["debug" if debug else "info"]

    def log(self, level: str, message: str) -> None:
        if self.LEVELS[level] < self.threshold:
            return
        if self._syslog is not None:
            priority = {"debug": self._syslog.LOG_DEBUG, "info": self._syslog.LOG_INFO,
                        "warn": self._syslog.LOG_WARNING, "error": self._syslog.LOG_ERR}[level]
            self._syslog.syslog(priority, message)
            return
        now = time.time()  # wall clock: this line is for a human
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        try:
            self.stream.write("%s.%03d %-5s %s\n" % (stamp, int(now * 1000) % 1000, level.upper(), message))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not stop the relay

    def debug(self, message: str) -> None:
        self.log("debug", message)

    def info(self, message: str) -> None:
        self.log("info", message)

    def warn(self, message: str) -> None:
        self.log("warn", message)

    def error(self, message: str) -> None:
        self.log("error", message)

    def allow(self, key: str, interval_s: float, lines: int = 1) -> bool:
        """May a line under `key` go out now?  At most `lines` in any `interval_s` (a token
        bucket: a burst of `lines`, then one each interval_s / lines)."""
        now = self.clock()
        tokens, at = self._buckets.get(key, (float(lines), now))
        tokens = min(float(lines), tokens + (now - at) * lines / interval_s)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def every(self, key: str, interval_s: float, level: str, message: str) -> None:
        """Log `message` unless a line with the same key went out less than interval_s ago."""
        if self.allow(key, interval_s):
            self.log(level, message)


class RateLimiter:
    """Token buckets by key: `burst` events at once, then `per_s` a second.  At most
    `max_keys` keys are kept; the longest unused are forgotten (which only forgives
    them: a global limiter bounds what many keys can do)."""

    def __init__(self, per_s: float, burst: int, max_keys: int = 4096) -> None:
        self.per_s, self.burst, self.max_keys = per_s, burst, max_keys
        self._buckets = {}  # type: Dict[Any, Tuple[float, float]]  # key -> (tokens, at), least recent first

    def allow(self, key: Any, now: float) -> bool:
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.per_s)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return allowed


class Counters(dict):
    """Named event counts (drops, errors); a missing name reads as zero."""

    def __missing__(self, key: str) -> int:
        return 0

    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


# ============================================================================
# Crypto: X25519 (RFC 7748), key derivation and packet MACs (keyed BLAKE2b)
# ============================================================================

_P25519 = 2 ** 255 - 19
_A24 = 121665
KEY_SIZE = 32


def _clamp_scalar(k: bytes) -> int:
    s = bytearray(k)
    s[0] &= 248
    s[31] &= 127
    s[31] |= 64
    return int.from_bytes(bytes(s), "little")


def x25519(private: bytes, u_point: bytes) -> bytes:
    """The X25519 function of RFC 7748 section 5: scalar times u-coordinate.

    Plain Montgomery ladder on Python integers.  It is not constant-time; it runs
    only at start-up on keys from the config, never on attacker-timed input.
    """
    if len(private) != KEY_SIZE or len(u_point) != KEY_SIZE:
        raise ProtocolError("X25519 keys are 32 bytes")
    p = _P25519
    k = _clamp_scalar(private)
    x1 = int.from_bytes(u_point, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    for t in range(254, -1, -1):
        bit = (k >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % p, (x2 - z2) % p
        aa, bb = a * a % p, b * b % p
        e = (aa - bb) % p
        c, d = (x3 + z3) % p, (x3 - z3) % p
        da, cb = d * a % p, c * b % p
        x3 = (da + cb) * (da + cb) % p
        z3 = x1 * (da - cb) * (da - cb) % p
        x2 = aa * bb % p
        z2 = e * (aa + _A24 * e) % p
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, p - 2, p) % p).to_bytes(KEY_SIZE, "little")


X25519_BASE_POINT = (9).to_bytes(KEY_SIZE, "little")


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    return x25519(private, X25519_BASE_POINT)


def generate_private_key() -> bytes:
    """A fresh private key from the OS's random source, clamped as RFC 7748 says."""
    k = bytearray(os.urandom(KEY_SIZE))
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return bytes(k)


def decode_key(text: str) -> bytes:
    """A base64 key from the config or the command line; ProtocolError if it is not 32 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError):
        raise ProtocolError("not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise ProtocolError("decodes to %d bytes, an X25519 key has 32" % len(raw))
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def kdf(key: bytes, label: bytes) -> bytes:
    """32 bytes derived from `key` for one purpose: BLAKE2b keyed with `key` over `label`."""
    return blake2b(label, key=key, digest_size=32).digest()


def static_secret(own_private: bytes, peer_public: bytes, client_public: bytes,
                  server_public: bytes) -> bytes:
    """The long-term secret of one client/server pair (static-static Diffie-Hellman).

    Both public keys are bound in, so a key is never shared between pairs.  An
    all-zero shared value means the peer's "public key" is a low-order point
    (RFC 7748 section 6.1); accepting it would let anyone compute the secret.
    """
    shared = x25519(own_private, peer_public)
    if shared == bytes(KEY_SIZE):
        raise ProtocolError("the public key is a low-order point (shared secret is zero)")
    return kdf(shared, b"mpudp v1 static" + client_public + server_public)


def make_mac(key: bytes):
    """A keyed BLAKE2b-128 object; each packet uses a copy (cheaper than re-keying).

    BLAKE2b rather than BLAKE2s: on the 64-bit CPUs of current routers and
    hosts it MACs a 1200-byte packet in ~60% of BLAKE2s's time (measured:
    1.6 us against 2.6 us), and four MACs lie on every echoed packet's path.
    """
    return blake2b(key=key, digest_size=MAC_SIZE)


class StaticKeys:
    """The handshake (HELLO, COOKIE, WELCOME) MAC keys of one client/server pair, derived once at start-up."""

    __slots__ = ("secret", "hello_mac", "welcome_mac")

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.hello_mac = make_mac(kdf(secret, b"hello c2s"))
        self.welcome_mac = make_mac(kdf(secret, b"welcome s2c"))


def epoch_keys(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> Tuple[bytes, bytes]:
    """The (client-to-server, server-to-client) data keys of one epoch."""
    master = kdf(secret, b"epoch" + client_nonce + server_nonce)
    return kdf(master, b"data c2s"), kdf(master, b"data s2c")


def handshake_nonce(tag: int) -> int:
    """The nonce field of HELLO, WELCOME and COOKIE: the epoch tag and the protocol version."""
    return tag << SEQ_BITS | PROTOCOL_VERSION


def epoch_tag(client_nonce: bytes) -> int:
    """The 16-bit epoch tag carried in every nonce: the client nonce's first two bytes."""
    return (client_nonce[0] << 8) | client_nonce[1]


# ============================================================================
# Wire format: headers, sealing, the replay window and epochs
# ============================================================================
#
# Every packet is HEADER | payload | MAC.  The hot paths in Client and Server
# build packets in place in a preallocated buffer with HEADER.pack_into and
# `seal_into`; `seal` and `parse_header` are the same rules for everything else.
#
# The nonce is epoch tag (16 bits) | sequence number (48 bits).  The sender
# numbers its packets 1, 2, 3... per direction per epoch; the receiver keeps a
# ReplayWindow per epoch and accepts each number once.  A packet whose tag is
# not a known epoch of that client is dropped before any MAC is computed.


def seal_into(buf: bytearray, mac, type_flags: int, link: int, client_id: int, session: int,
              nonce: int, payload_len: int) -> int:
    """Write the header before the payload already at buf[16:16+payload_len] and the MAC
    after it; return the packet's length."""
    HEADER.pack_into(buf, 0, type_flags, link, client_id, session, nonce)
    end = HEADER_SIZE + payload_len
    m = mac.copy()
    m.update(memoryview(buf)[:end])
    buf[end:end + MAC_SIZE] = m.digest()
    return end + MAC_SIZE


def seal(mac, type_flags: int, link: int, client_id: int, session: int, nonce: int,
         payload: bytes) -> bytes:
    """One whole packet as bytes."""
    buf = bytearray(OVERHEAD + len(payload))
    buf[HEADER_SIZE:HEADER_SIZE + len(payload)] = payload
    seal_into(buf, mac, type_flags, link, client_id, session, nonce, len(payload))
    return bytes(buf)


def verify(mac, packet, length: int) -> bool:
    """True if the last 16 bytes of packet[:length] are the MAC of the rest."""
    m = mac.copy()
    m.update(packet[:length - MAC_SIZE])
    return compare_digest(m.digest(), packet[length - MAC_SIZE:length])


def parse_header(packet) -> Tuple[int, int, int, int, int]:
    """(type_flags, link, client_id, session, nonce) of a packet; ProtocolError if too short."""
    if len(packet) < OVERHEAD:
        raise ProtocolError("packet of %d bytes is shorter than the %d-byte overhead" % (len(packet), OVERHEAD))
    return HEADER.unpack_from(packet)


class ReplayWindow:
    """Which of the last REPLAY_WINDOW_SIZE sequence numbers were already accepted.

    RFC 6479 keeps a ring of bitmap words; here the ring holds the sequence
    number last accepted in each slot, which needs no clearing as the window
    slides: `seq` was seen iff slots[seq % size] == seq.  Numbers at or below
    `top - size` are too old to tell apart from a replay and are refused.
    Callers check `fresh` before the MAC and `mark` after it, so forged packets
    cannot move the window.
    """

    __slots__ = ("size", "top", "_slots")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        self.size = size
        self.top = 0
        self._slots = array("Q", bytes(8 * size))

    def fresh(self, seq: int) -> bool:
        """Would `seq` be accepted?  Sequence numbers start at 1."""
        if seq == 0 or seq + self.size <= self.top:
            return False
        return self._slots[seq % self.size] != seq

    def seen(self, seq: int) -> bool:
        """Was `seq` accepted, and is it still inside the window?  (A copy, not an old packet.)"""
        return seq + self.size > self.top and self._slots[seq % self.size] == seq

    def mark(self, seq: int) -> None:
        """Record `seq` as accepted (after its MAC verified)."""
        self._slots[seq % self.size] = seq
        if seq > self.top:
            self.top = seq


class Epoch:
    """The data keys, replay window and send counter agreed by one handshake."""

    __slots__ = ("tag", "nonce_base", "client_nonce", "server_nonce", "tx_mac", "rx_mac",
                 "window", "tx_seq")

    def __init__(self, secret: bytes, client_nonce: bytes, server_nonce: bytes, is_client: bool) -> None:
        c2s, s2c = epoch_keys(secret, client_nonce, server_nonce)
        self.tag = epoch_tag(client_nonce)
        self.nonce_base = self.tag << SEQ_BITS
        self.client_nonce = client_nonce
        self.server_nonce = server_nonce
        self.tx_mac = make_mac(c2s if is_client else s2c)
        self.rx_mac = make_mac(s2c if is_client else c2s)
        self.window = ReplayWindow()
        self.tx_seq = 0

    def next_nonce(self) -> int:
        self.tx_seq += 1
        return self.nonce_base | self.tx_seq

    def open(self, view: memoryview, off: int, n: int, seq: int) -> str:
        """Accept the packet at view[off:off + n], numbered `seq`: "" if it is fresh and its
        MAC verifies (it is then marked as seen), else the name of the drop's counter.
        The window is checked before the MAC and marked after it, so forged packets
        cost one look-up and cannot move the window."""
        window = self.window
        if not window.fresh(seq):
            # A copy sent on another link too (redundancy), or a replay: dropped alike.
            return "duplicate" if window.seen(seq) else "replay"
        end = off + n - MAC_SIZE
        m = self.rx_mac.copy()
        m.update(view[off:end])
        if not compare_digest(m.digest(), view[end:end + MAC_SIZE]):
            return "auth"
        window.mark(seq)
        return ""

    def authentic(self, view: memoryview, off: int, n: int) -> bool:
        """Does the packet's MAC verify?  For a copy the window already saw (redundancy):
        it is dropped all the same, but it counts as data that crossed its link."""
        end = off + n - MAC_SIZE
        m = self.rx_mac.copy()
        m.update(view[off:end])
        return compare_digest(m.digest(), view[end:end + MAC_SIZE])


# ============================================================================
# Link measurement and policy
# ============================================================================
#
# How a link is judged.  Each heartbeat is a record: sent at, answered or
# timed out, and whether it reached the server (from the 32-bit bitmap of
# recent heartbeats that every echo carries).  From the records:
#
# - RTT is smoothed as RFC 6298 (srtt, rttvar); jitter as RFC 3550.
# - A heartbeat times out after srtt + 4 * rttvar, clamped to
#   [HEARTBEAT_TIMEOUT_FLOOR_S, HEARTBEAT_TIMEOUT_CEILING_S]: a fast link is
#   judged fast, a slow one is not punished for being slow.
# - Loss is the share of unanswered heartbeats among the last
#   LOSS_WINDOW_HEARTBEATS resolved ones: a sliding window, never reset on a
#   schedule.  Uplink loss counts heartbeats the server never saw; downlink
#   loss counts echoes lost after the server saw the heartbeat.  The window is
#   50 so that one lost heartbeat (2%, 10 points at the default loss_weight)
#   stays below the default switch_threshold: with a window of 20 a single
#   loss was worth 25 points, and two equal links with light random loss
#   swapped traffic a dozen times in ten minutes (simulated).
# - After the first miss the link is probed every half timeout, so
#   `max_consecutive_fail` misses in a row (down) take a fraction of a second
#   rather than that many heartbeat intervals.  One answer makes the link up
#   again, but it is a regular candidate ("steady") only after
#   RECOVERY_ANSWERS answers in a row, so a flapping link is not chosen.
#
# The score is the original's: -(loss_weight * loss% + rtt_weight * rtt_ms)
# - priority.  SwitchPolicy then decides: leave a dead active link at once;
# otherwise switch only to a steady link better by `switch_threshold`, not
# sooner than a dwell time after the last switch and not while the active
# link carries more than `throughput_threshold_kbps`.


class HeartbeatRecord:
    __slots__ = ("seq", "sent_at", "answered", "timed_out", "reached")

    def __init__(self, seq: int, sent_at: float) -> None:
        self.seq = seq
        self.sent_at = sent_at
        self.answered = False
        self.timed_out = False
        self.reached = None  # type: Optional[bool]


class LinkHealth:
    """RTT, loss and up/down state of one link from its heartbeats; pure (no I/O, no clock)."""

    def __init__(self, max_consecutive_fail: int, loss_window: int = LOSS_WINDOW_HEARTBEATS,
                 recovery_hold_s: float = 0.0) -> None:
        self.max_consecutive_fail = max_consecutive_fail
        self.recovery_hold_s = recovery_hold_s
        self.last_answer_at = None  # type: Optional[float]
        self.up = False
        self.srtt = None  # type: Optional[float]
        self.rttvar = 0.0
        self.jitter = 0.0
        self.last_rtt = None  # type: Optional[float]
        self.consecutive_fail = 0
        self.consecutive_ok = 0
        self.changed_at = None  # type: Optional[float]
        self._records = deque()  # type: deque
        self._by_seq = {}  # type: Dict[int, HeartbeatRecord]
        self._window = loss_window

    # -- events --------------------------------------------------------------

    def on_sent(self, seq: int, now: float) -> None:
        if len(self._records) >= self._window + 32:  # keep 32 extra for late bitmaps
            old = self._records.popleft()
            self._by_seq.pop(old.seq, None)
        record = HeartbeatRecord(seq, now)
        self._records.append(record)
        self._by_seq[seq] = record

    def on_echo(self, seq: int, bitmap: int, now: float) -> bool:
        """An echo of heartbeat `seq` arrived; True if the link just came up."""
        record = self._by_seq.get(seq)
        if record is None or record.answered:
            return False
        record.answered = True
        record.reached = True
        self._add_rtt_sample(now - record.sent_at)
        self.last_answer_at = now
        for other in self._records:
            back = seq - other.seq
            if 0 < back < 32 and not other.answered:
                other.reached = bool((bitmap >> back) & 1)
        self.consecutive_fail = 0
        self.consecutive_ok += 1
        if not self.up:
            self.up = True
            self.changed_at = now
            return True
        return False

    def on_timeout(self, seq: int, now: float) -> bool:
        """Heartbeat `seq` was not answered in time; True if the link just went down."""
        record = self._by_seq.get(seq)
        if record is None or record.answered or record.timed_out:
            return False
        record.timed_out = True
        if self.up and self.changed_at is not None and record.sent_at < self.changed_at:
            return False  # sent during the outage that just ended: counts as loss, not as a new miss
        self.consecutive_fail += 1
        self.consecutive_ok = 0
        if self.up and self.consecutive_fail >= self.max_consecutive_fail:
            self.up = False
            self.changed_at = now
            return True
        return False

    def force_down(self, now: float) -> bool:
        """The link cannot carry anything (its interface or address is gone, or the
        kernel has no route for it): down now, not after max_consecutive_fail misses.
        True if it was up."""
        self.consecutive_ok = 0
        if not self.up:
            return False
        self.up = False
        self.changed_at = now
        return True

    def _add_rtt_sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        if self.last_rtt is not None:
            self.jitter += (abs(rtt - self.last_rtt) - self.jitter) / 16
        self.last_rtt = rtt

    # -- readings ------------------------------------------------------------

    def timeout(self) -> float:
        """How long to wait for an echo before counting a heartbeat as lost."""
        if self.srtt is None:
            return INITIAL_HEARTBEAT_TIMEOUT_S
        rto = self.srtt + 4 * self.rttvar
        return min(max(rto, HEARTBEAT_TIMEOUT_FLOOR_S), HEARTBEAT_TIMEOUT_CEILING_S)

    @property
    def steady(self) -> bool:
        """Up and answering for long enough to be chosen in a regular evaluation: RECOVERY_ANSWERS
        answers in a row, the last at least `recovery_hold_s` after the link came up (fast
        probes around an outage's end answer quickly, and must not make up the count alone)."""
        return (self.up and self.consecutive_ok >= RECOVERY_ANSWERS
                and self.last_answer_at - self.changed_at >= self.recovery_hold_s)

    def _resolved(self) -> List[HeartbeatRecord]:
        recent = list(self._records)[-self._window:]
        return [r for r in recent if r.answered or r.timed_out]

    def loss(self) -> float:
        """Share (0..1) of recent heartbeats that got no answer."""
        resolved = self._resolved()
        if not resolved:
            return 0.0
        return sum(1 for r in resolved if not r.answered) / len(resolved)

    def recent_misses(self, count: int) -> int:
        """How many of the last `count` heartbeats with an outcome got no answer."""
        return sum(1 for r in self._resolved()[-count:] if not r.answered)

    def loss_up(self) -> Optional[float]:
        """Share of recent heartbeats the server never received; None if unknown."""
        known = [r for r in self._resolved() if r.reached is not None]
        if not known:
            return None
        return sum(1 for r in known if not r.reached) / len(known)

    def loss_down(self) -> Optional[float]:
        """Share of recent echoes lost on the way back; None if unknown."""
        reached = [r for r in self._resolved() if r.reached]
        if not reached:
            return None
        return sum(1 for r in reached if not r.answered) / len(reached)

    def score(self, loss_weight: float, rtt_weight: float, priority: float) -> float:
        return link_score(self.loss() if self.up else 1.0,
                          self.srtt if self.srtt is not None else HEARTBEAT_TIMEOUT_CEILING_S,
                          priority, loss_weight, rtt_weight)


def link_score(loss: float, rtt_s: float, priority: float, loss_weight: float,
               rtt_weight: float) -> float:
    """The original's score: -(loss_weight * loss% + rtt_weight * rtt_ms) - priority."""
    return -(loss_weight * loss * 100.0 + rtt_weight * rtt_s * 1000.0) - priority


class ThroughputMeter:
    """Bytes both ways over a sliding window, sampled at evaluations, never per packet."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples = deque()  # type: deque

    def sample(self, now: float, total_bytes: int) -> None:
        self._samples.append((now, total_bytes))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def kbps(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) * 8 / 1000.0 / (t1 - t0) if t1 > t0 else 0.0


class DataLiveness:
    """Does a link carry data, each way?  Heartbeats alone cannot tell: a path may drop
    only DATA (the type is in the clear) or only large datagrams (an MTU black hole:
    PPPoE, LTE, a tunnel in a tunnel) and still answer every 48-byte heartbeat.

    Each HEARTBEAT carries the client's counts of DATA sent and received on its link,
    each ECHO the server's.  When none of the last DATA_LOST_PACKETS data packets sent
    one way on the link arrived (over one echo or several in a row), the link is
    unfit for data, whatever its heartbeats say.  Random loss is not that: even at 50%
    a run of 16 lost in a row comes once in 65,536.  Its heartbeats go on measuring
    it, and it is tried again after a hold that doubles while data keeps failing on
    it.  Pure: counts and `now` in, a verdict out."""

    __slots__ = ("unfit_until", "hold_s", "lost_way", "_last", "_unanswered_up", "_unanswered_down")

    def __init__(self) -> None:
        self.unfit_until = None  # type: Optional[float]
        self.hold_s = DATA_RETRY_FIRST_S
        self.lost_way = ""  # "up" or "down": which way data was lost last
        self._last = None  # type: Optional[Tuple[int, int, int, int]]  # the counts at the last echo
        self._unanswered_up = 0  # sent since data last arrived at the server
        self._unanswered_down = 0  # sent by the server since data last arrived here

    def fit(self, now: float) -> bool:
        return self.unfit_until is None or now >= self.unfit_until

    def on_echo(self, sent_at_heartbeat: int, received_now: int, server_rx: int, server_tx: int,
                now: float) -> bool:
        """One echo's counts (ours wrap as the wire's do); True if the link just became unfit."""
        counts = (sent_at_heartbeat & COUNT_MASK, server_rx, server_tx, received_now & COUNT_MASK)
        last, self._last = self._last, counts
        if last is None:
            return False
        sent, arrived, server_sent, received = ((new - old) & COUNT_MASK for new, old in zip(counts, last))
        if max(sent, arrived, server_sent, received) >= 1 << 31:
            return False  # a count went back: a new server, or an echo older than the last
        self._unanswered_up = 0 if arrived else self._unanswered_up + sent
        self._unanswered_down = 0 if received else self._unanswered_down + server_sent
        if arrived or received:
            self.hold_s = DATA_RETRY_FIRST_S  # it carries data: the next failure waits little
        up_failed = self._unanswered_up >= DATA_LOST_PACKETS
        down_failed = self._unanswered_down >= DATA_LOST_PACKETS
        if not (up_failed or down_failed) or not self.fit(now):
            return False
        self.lost_way = "up" if up_failed else "down"
        self.unfit_until = now + self.hold_s
        self.hold_s = min(self.hold_s * 2, DATA_RETRY_CEILING_S)
        self._unanswered_up = self._unanswered_down = 0  # count afresh for the next verdict
        return True


class PathMtuSearch:
    """The largest datagram a link carries both ways: DPLPMTUD (RFC 8899) in spirit.

    Heartbeats are small; data is not.  A path that silently drops datagrams over
    some size (PPPoE, LTE, a tunnel in a tunnel, ICMP filtered so PMTUD fails)
    answers every heartbeat and loses every full-size packet.  So the client
    sends PROBEs padded to a size, with DF set, and the server answers each with
    a PROBE_ACK of the same size: an answer proves the size passes both ways.

    The search probes the interface's MTU first (most paths carry it), then the
    IPv6 minimum (1280, assumed to pass), then 1500, then halves the interval
    between the largest size answered and the smallest size lost
    PMTU_PROBE_TRIES times, down to PMTU_GRANULARITY bytes.  `limit`, what
    steering reads, is the smallest size known not to pass: it is tightened as
    soon as a size is lost, and relaxed only when a new search (after a data
    failure, a new address, or PMTU_RAISE_S) ends without losing it.  Pure:
    sizes in, the next size to probe out; PathProber does the I/O."""

    __slots__ = ("ceiling", "base", "common", "confirmed", "failed", "limit", "tries", "searching")

    def __init__(self, ceiling: int, headers: int) -> None:
        self.ceiling = ceiling  # the largest datagram the route's interface sends
        self.base = PMTU_BASE - headers
        self.common = COMMON_PATH_MTU - headers
        self.confirmed = 0  # the largest size answered (this search, or the last one)
        self.failed = ceiling + 1  # the smallest size lost PMTU_PROBE_TRIES times in this search
        self.limit = None  # type: Optional[int]  # the smallest size known not to pass
        self.tries = 0  # of the size probed now
        self.searching = True

    def restart(self, ceiling: int, headers: int) -> None:
        """Search from nothing: a new address or interface, or data stopped passing."""
        self.ceiling, self.base, self.common = ceiling, PMTU_BASE - headers, COMMON_PATH_MTU - headers
        self.confirmed, self.failed, self.tries, self.searching = 0, ceiling + 1, 0, True

    def raise_(self) -> None:
        """PMTU_RAISE_S after a search: has the path grown?  What passed stays confirmed."""
        self.failed, self.tries, self.searching = self.ceiling + 1, 0, True

    def next_size(self) -> Optional[int]:
        """The size to probe next, or None when the search is over."""
        low, high = self.confirmed, self.failed
        if self.searching and (high - low > PMTU_GRANULARITY and high > self.base):
            for size in (self.ceiling, self.base, self.common):
                if low < size < high:
                    return size
            return (low + high) // 2
        if self.searching:
            self.searching = False
            self.limit = high if high <= self.ceiling else None
        return None

    def on_answered(self, size: int) -> None:
        self.confirmed = max(self.confirmed, size)
        self.failed = max(self.failed, size + 1)  # an answer for a size lost before: the path grew
        self.tries = 0

    def on_lost(self, size: int, tries: int = 1) -> bool:
        """A probe of `size` was not answered (`tries` counts a local refusal as all of
        them); True if that size is now known not to pass."""
        self.tries += tries
        if self.tries < PMTU_PROBE_TRIES:
            return False
        self.tries = 0
        self.failed = min(self.failed, size)
        if self.limit is None or size < self.limit:
            self.limit = size
        return True

    def carries(self, payload: int) -> bool:
        """Does an application datagram of `payload` bytes pass, as far as is known?"""
        return self.limit is None or payload + OVERHEAD < self.limit


class _RecentBuckets:
    """What was noted in the last one to two periods: two buckets, the one being filled
    and the one before, which `_rotate` moves on once a period."""

    __slots__ = ("period", "current", "previous", "since")

    def __init__(self, period: float, empty: Any) -> None:
        self.period = period
        self.current = self.previous = empty
        self.since = None  # type: Optional[float]

    def _rotate(self, now: float, empty: Any) -> None:
        if self.since is None:
            self.since = now
        elif now - self.since >= self.period:
            self.previous, self.current, self.since = self.current, empty, now


class RecentMax(_RecentBuckets):
    """The largest value noted lately.  `note` is a comparison, for the packet path; the
    clock is read only by `value`."""

    __slots__ = ()

    def __init__(self, period: float) -> None:
        super().__init__(period, 0)

    def note(self, value: int) -> None:
        if value > self.current:
            self.current = value

    def value(self, now: float) -> int:
        self._rotate(now, 0)
        return max(self.current, self.previous)


class LinkRate:
    """One way of one link, for aggregation: what it carried over the last heartbeat
    interval (from the echo's counts), what it lost, how much its one-way delay rose
    above its least (the server measures the way towards it; the rest of the RTT's
    rise is the way back), and its share of the traffic (`rebalance`)."""

    __slots__ = ("share", "rate", "sent_rate", "delivered_rate", "lost_share", "queue_s", "capacity")

    def __init__(self) -> None:
        self.share = 1.0  # relative to the other carriers' (rebalance normalises)
        self.rate = AGG_INITIAL_RATE  # bytes/s: its share of what the carriers deliver, for the Spreader
        self.sent_rate = self.delivered_rate = 0.0
        self.lost_share = 0.0
        self.queue_s = 0.0
        self.capacity = None  # type: Optional[float]  # bytes/s it delivered when last full (None: never seen full)

    def on_interval(self, sent_bytes: int, delivered_bytes: int, lost_share: float, queue_s: float,
                    interval_s: float) -> None:
        if interval_s > 0:
            self.sent_rate, self.delivered_rate = sent_bytes / interval_s, delivered_bytes / interval_s
            self.lost_share, self.queue_s = lost_share, queue_s

    def note_capacity(self, full: bool) -> None:
        """What it delivered while full is what it can carry; more delivered since raises that."""
        if full or (self.capacity is not None and self.delivered_rate > self.capacity):
            self.capacity = self.delivered_rate


def rebalance(ways: Sequence[LinkRate], delays: Sequence[float]) -> None:
    """Each heartbeat interval, the carriers' shares of one way's traffic, with no rate
    in the config, while they carry data:

    - a carrier whose queue is above the least of theirs by AGG_QUEUE_MARGIN_S, or
      that lost data (AGG_LOSS_SIGNAL), is full: what it delivered is what it can
      carry, so from now on it is sent that (a little less while its queue drains,
      AGG_DRAIN_S), and at least AGG_STEP less than before; the others take the
      rest.  When every carrier is full, the split is by what each delivered
      (`_fit_full`);
    - while none is full, the carriers whose one-way delay (`delays`) is above the
      least by AGG_QUEUE_MARGIN_S give up AGG_STEP to the faster ones: a slow link
      (a satellite beside fibre) carries only what the fast one cannot.  They keep
      their share while the faster ones are known to be too small for what is sent
      (`_faster_have_room`): a TCP flow that backs off after a loss, below what the
      links carry together, must not lose the slow link's share, or it would have
      to fill the fast link again before it got it back.

    So the shares follow the links' capacities, and a capacity that changes, within
    an interval or two; an overload of every link is split by what each delivered.
    Each link's `rate` is then its share of what the carriers delivered together,
    with AGG_HEADROOM: the Spreader's backlogs grow when the applications send more
    than that, and a packet goes on a slower link only when the faster one's
    backlog would make it arrive later.  Pure."""
    if not ways:
        return
    delivered = sum(way.delivered_rate for way in ways)
    if len(ways) > 1 and delivered > AGG_MIN_RATE * len(ways):
        least_queue = min(way.queue_s for way in ways)
        full = [way.lost_share > AGG_LOSS_SIGNAL or way.queue_s > least_queue + AGG_QUEUE_MARGIN_S
                for way in ways]
        for way, is_full in zip(ways, full):
            way.note_capacity(is_full)
        if any(full):
            _fit_full(ways, full, least_queue)
        else:
            least_delay = min(delays)
            slower = [delay > least_delay + AGG_QUEUE_MARGIN_S for delay in delays]
            if _faster_have_room(ways, slower):
                _shift_shares(ways, [AGG_STEP if is_slower else 0.0 for is_slower in slower])
    total_share = sum(way.share for way in ways)
    for way in ways:
        way.share = max(AGG_MIN_SHARE, way.share / total_share)
    total_share = sum(way.share for way in ways)
    scale = max(AGG_MIN_RATE * len(ways), AGG_HEADROOM * delivered)
    for way in ways:
        way.rate = scale * way.share / total_share


def _faster_have_room(ways: Sequence[LinkRate], slower: Sequence[bool]) -> bool:
    """Whether the ways that are not `slower` could carry what all of them are sent now,
    with AGG_HEADROOM: yes while one of them has never been seen full (nothing says it
    cannot), else by what they delivered when they were."""
    known = [way.capacity for way, is_slower in zip(ways, slower) if not is_slower]
    if None in known:
        return True
    return sum(known) >= AGG_HEADROOM * sum(way.sent_rate for way in ways)


def _fit_full(ways: Sequence[LinkRate], full: Sequence[bool], least_queue: float) -> None:
    """Give each full way the part of what was sent that it delivered, less what drains its
    queue, and at least AGG_STEP less than it had (so a flow that adapts, such as TCP,
    finds the room the others have), but not less than half (one interval's count can be
    off); the others share the rest as they did.  All full (more is sent than the links
    carry together): split by what each delivered, which holds still."""
    sent = sum(way.sent_rate for way in ways)
    if sent <= 0:
        return
    if all(full):
        for way in ways:
            way.share = max(way.delivered_rate, AGG_MIN_RATE)
        return
    total_share = sum(way.share for way in ways)
    fitted = 0.0
    for way, is_full in zip(ways, full):
        if is_full:
            had = way.share / total_share
            drain = min(AGG_MAX_DRAIN, (way.queue_s - least_queue) / AGG_DRAIN_S)
            way.share = min(had * (1.0 - AGG_STEP), max(had / 2, way.delivered_rate * (1.0 - drain) / sent))
            fitted += way.share
    others = sum(way.share for way, is_full in zip(ways, full) if not is_full)
    for way, is_full in zip(ways, full):
        if not is_full:
            way.share = (1.0 - fitted) * way.share / others


def _shift_shares(ways: Sequence[LinkRate], steps: Sequence[float]) -> None:
    """Each way gives up `step` of its share; the ways that give nothing take it, by their shares."""
    takers = sum(way.share for way, step in zip(ways, steps) if not step)
    if not takers:
        return
    freed = 0.0
    for way, step in zip(ways, steps):
        freed += way.share * step
        way.share -= way.share * step
    for way, step in zip(ways, steps):
        if not step:
            way.share += freed * way.share / (takers or 1.0)


class Spreader:
    """Which link each datagram goes on, when aggregating: the one where it would arrive
    first (as the multipath TCP and QUIC schedulers do): one-way delay plus the time
    the link needs for what it was given before.  Each link's virtual queue is kept
    as the time it empties at its rate, so a rate that changes affects only what
    comes next.  A link with room takes more, a slow one takes what the fast one
    cannot carry sooner, and a link that adds more delay than capacity gets nothing
    until the others queue.  When more comes than the rates say the links carry,
    the queues grow in proportion to the rates (the split stays by rate), and no
    further than SPREAD_AHEAD_S beyond the shortest: a long overload leaves nothing
    stale behind.  Pure."""

    __slots__ = ("_free_at",)

    def __init__(self) -> None:
        self._free_at = {}  # type: Dict[Any, float]  # link -> when its virtual queue empties

    def pick(self, links: Sequence[Tuple[Any, float, float]], size: int, now: float) -> Any:
        """The link (of (link, rate bytes/s, one-way delay s)) a datagram of `size` bytes goes on."""
        free_at = self._free_at
        best, best_arrival, best_done = None, 0.0, 0.0
        for link, rate, delay in links:
            start = free_at.get(link, now)
            done = (start if start > now else now) + size / rate
            if best is None or done + delay < best_arrival:
                best, best_arrival, best_done = link, done + delay, done
        free_at[best] = best_done
        if best_done - now > SPREAD_AHEAD_S:  # the shortest queue is no longer than the chosen one's
            ahead = min(free_at.get(link, now) for link, _rate, _delay in links) - now
            if ahead > SPREAD_AHEAD_S:  # all overloaded: keep their differences, not their lead
                for link, _rate, _delay in links:
                    free_at[link] -= ahead - SPREAD_AHEAD_S
        return best


class ReorderBuffer:
    """Puts back in order what several links delivered out of it (aggregation).

    The sender numbers every packet of one direction of an epoch (the nonce), so the
    receiver knows the order; each link keeps it (a path is FIFO).  An early packet
    waits for the ones before it, until (1) they come, (2) every link that carries
    data (`carriers`) has delivered one newer than the missing one (then it was
    lost: no waiting for a timer), or (3) it has waited `hold_s`: the links' delay
    difference plus their jitter, never more than REORDER_HOLD_CAP_S.  Control
    packets take their place in the order too (`arrive` with no item).  A packet
    later than that is delivered at once: late is better than lost for TCP.
    Items are (session, payload bytes): the caller copies only early packets."""

    __slots__ = ("next", "held", "hold_s", "carriers", "_newest", "released_late", "skipped")

    def __init__(self, first: int = 0) -> None:
        self.next = first  # the sequence number delivered next (0: the first to arrive)
        self.held = {}  # type: Dict[int, Tuple[float, Any]]  # seq -> (arrival, item or None)
        self.hold_s = REORDER_HOLD_CAP_S
        self.carriers = ()  # type: Tuple[int, ...]  # the links data comes on (the others: control only)
        self._newest = {}  # type: Dict[int, int]  # link -> the newest seq it delivered
        self.released_late = self.skipped = 0  # for the status and the tests

    def reset(self, first: int = 1) -> None:
        """A new epoch numbers from 1 again."""
        self.next = first
        self.held.clear()
        self._newest.clear()

    def arrive(self, seq: int, link: int, item: Any, now: float, out: List[Any]) -> None:
        """Packet `seq` came on `link`; what may be delivered now is appended to `out`, in order."""
        if seq > self._newest.get(link, 0):
            self._newest[link] = seq
        if item is not None and link not in self.carriers:
            self.carriers += (link,)
        if not self.next:
            self.next = seq
        if seq < self.next:
            if item is not None:
                self.released_late += 1
                out.append(item)
            return
        if seq > self.next:
            self.held[seq] = (now, item)
        else:
            if item is not None:
                out.append(item)
            self.next += 1
        if self.held:
            self._release(now, out)

    def in_order(self, seq: int, link: int, data: bool) -> bool:
        """The packet path's question, per packet: is `seq` the next one, with nothing
        waiting?  If so it is taken as delivered (the caller delivers it); if not, the
        caller hands it to `arrive`."""
        if data and link not in self.carriers:
            self.carriers += (link,)  # it carries data, whatever the sender said last
        if seq != self.next or self.held:
            return False
        self.next = seq + 1
        if seq > self._newest.get(link, 0):
            self._newest[link] = seq
        return True

    def expire(self, now: float, out: List[Any]) -> None:
        """Give up on what kept packets waiting longer than hold_s (a timer calls this)."""
        if self.held:
            self._release(now, out)

    def deadline(self) -> Optional[float]:
        """When the oldest waiting packet's hold ends (None if none waits)."""
        return min(at for at, _item in self.held.values()) + self.hold_s if self.held else None

    def _release(self, now: float, out: List[Any]) -> None:
        held = self.held
        while held:
            entry = held.pop(self.next, None)
            if entry is not None:
                if entry[1] is not None:
                    out.append(entry[1])
                self.next += 1
                continue
            # self.next is missing: lost if every carrier is past it (all before the
            # oldest of their newest are), or if the oldest packet waiting behind it
            # has waited long enough (all before the first waiting one are).
            newest = self._newest
            passed = min([newest.get(link, 0) for link in self.carriers] or [0])
            if passed > self.next:
                self.skipped += 1
                self.next = min(passed, min(held))
            elif now - min(at for at, _item in held.values()) >= self.hold_s:
                self.skipped += 1
                self.next = min(held)
            else:
                return


class RecentMin(_RecentBuckets):
    """The least value noted lately (a link's least RTT: a path that moved, to a longer
    one, is seen anew); None before the first."""

    __slots__ = ()

    def __init__(self, period: float) -> None:
        super().__init__(period, None)

    def note(self, value: float, now: float) -> None:
        self._rotate(now, None)
        if self.current is None or value < self.current:
            self.current = value

    def value(self) -> Optional[float]:
        values = [v for v in (self.current, self.previous) if v is not None]
        return min(values) if values else None


class Candidate:
    """What the policy needs to know of one link."""

    __slots__ = ("up", "steady", "score", "kbps")

    def __init__(self, up: bool, steady: bool, score: float, kbps: float = 0.0) -> None:
        self.up, self.steady, self.score, self.kbps = up, steady, score, kbps

    def __repr__(self) -> str:
        return "Candidate(up=%r, steady=%r, score=%.1f, kbps=%.1f)" % (self.up, self.steady, self.score, self.kbps)


class SwitchPolicy:
    """Which link carries traffic: a pure function of the candidates, the active link and time."""

    def __init__(self, switch_threshold: float, throughput_threshold_kbps: float,
                 min_dwell_s: float) -> None:
        self.switch_threshold = switch_threshold
        self.throughput_threshold_kbps = throughput_threshold_kbps
        self.min_dwell_s = min_dwell_s

    @staticmethod
    def _best(links: Sequence[Candidate], indices: Sequence[int]) -> int:
        return max(indices, key=lambda i: (links[i].score, -i))  # ties go to the first listed

    def choose(self, links: Sequence[Candidate], active: Optional[int],
               last_switch_at: Optional[float], now: float) -> Tuple[int, str]:
        """(index, reason): the link to use and why it changed, or reason "" to stay."""
        up = [i for i, link in enumerate(links) if link.up]
        if active is None:
            return self._best(links, up or range(len(links))), "first choice"
        if not links[active].up:
            if not up:
                return active, ""  # all down: keep the least-bad one, keep probing
            steady = [i for i in up if links[i].steady]
            return self._best(links, steady or up), "active link down"
        others = [i for i in up if i != active and links[i].steady]
        if not others:
            return active, ""
        best = self._best(links, others)
        gain = links[best].score - links[active].score
        if gain <= self.switch_threshold:
            return active, ""
        if last_switch_at is not None and now - last_switch_at < self.min_dwell_s:
            return active, ""
        if links[active].kbps > self.throughput_threshold_kbps:
            return active, ""  # busy: do not disturb a flow that is working
        return best, "better by %.1f" % gain


# ============================================================================
# Reactor: one selectors loop and a timer heap
# ============================================================================


class Timer:
    """A scheduled call; cancel() is O(1), drops the callback's references and tells
    the reactor, which counts the dead entries it leaves in the heap."""

    __slots__ = ("reactor", "when", "callback", "args", "cancelled", "in_heap")

    def __init__(self, reactor: "Reactor", when: float, callback: Callable, args: tuple) -> None:
        self.reactor = reactor
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.in_heap = True

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.callback = None
        self.args = ()
        if self.in_heap:
            self.reactor._dead_entry_left()


class Periodic:
    """A call repeated every `interval` seconds, re-armed from its scheduled time (no drift)."""

    __slots__ = ("reactor", "interval", "callback", "args", "timer")

    def __init__(self, reactor: "Reactor", interval: float, callback: Callable, args: tuple) -> None:
        self.reactor = reactor
        self.interval = interval
        self.callback = callback
        self.args = args
        self.timer = reactor.call_later(interval, self._fire)

    def _fire(self) -> None:
        when = self.timer.when + self.interval
        now = self.reactor.time()
        if when <= now:  # fell behind (a long stall): skip the missed ticks
            when = now + self.interval
        self.timer = self.reactor.call_at(when, self._fire)
        self.callback(*self.args)

    def cancel(self) -> None:
        self.timer.cancel()


class Reactor:
    """The event loop: readable sockets and due timers, one callback at a time.

    Heap entries are (when, seq, timer): seq breaks ties so equal deadlines fire
    in the order they were set and Timer objects are never compared.
    Cancelled timers stay in the heap until popped, or until they are more than
    half of it, when the heap is rebuilt without them.  Every callback is
    guarded: an exception is counted and logged, and the loop goes on.

    `call_soon` runs a call right after the current callback returns: the data
    path reports to control that way, so control never runs inside a drain.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, log: Optional[Log] = None) -> None:
        self.time = clock
        self.log = log or Log()
        self.selector = selectors.DefaultSelector()
        self.errors = Counters()
        self._heap = []  # type: List[Tuple[float, int, Timer]]
        self._seq = 0
        self._cancelled_in_heap = 0
        self._stopping = False
        self._signal_sock = None  # type: Optional[socket.socket]
        self._signal_handlers = {}  # type: Dict[int, Callable]
        self._signals_arrived = {}  # type: Dict[int, bool]  # recorded by the handler, not yet run
        self._removed = []  # type: List[selectors.SelectorKey]  # readers removed in this pass
        self._soon = deque()  # type: deque  # (callback, args) to run after the current callback

    # -- timers --------------------------------------------------------------

    def call_at(self, when: float, callback: Callable, *args) -> Timer:
        timer = Timer(self, when, callback, args)
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer))
        return timer

    def call_later(self, delay: float, callback: Callable, *args) -> Timer:
        return self.call_at(self.time() + delay, callback, *args)

    def call_every(self, interval: float, callback: Callable, *args) -> Periodic:
        return Periodic(self, interval, callback, args)

    def call_soon(self, callback: Callable, *args) -> None:
        """Run callback(*args) once the callback running now has returned."""
        self._soon.append((callback, args))

    def cancel(self, timer: Optional[Timer]) -> None:
        """Cancel a timer; None is fine."""
        if timer is not None:
            timer.cancel()

    def _dead_entry_left(self) -> None:
        """A timer still in the heap was cancelled: compact the heap when it is mostly dead."""
        self._cancelled_in_heap += 1
        if self._cancelled_in_heap > 64 and self._cancelled_in_heap * 2 > len(self._heap):
            for entry in self._heap:
                if entry[2].cancelled:
                    entry[2].in_heap = False
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled_in_heap = 0

    @property
    def pending_timers(self) -> int:
        return sum(1 for entry in self._heap if not entry[2].cancelled)

    # -- sockets -------------------------------------------------------------

    def add_reader(self, sock: socket.socket, handler: Callable[[], None]) -> None:
        self.selector.register(sock, selectors.EVENT_READ, handler)

    def remove_reader(self, sock: socket.socket) -> None:
        try:
            key = self.selector.unregister(sock)
        except (KeyError, ValueError):
            return
        # Its event may be in the batch being dispatched (a callback closed it):
        # run_once skips it, and the handler never sees a closed socket.
        self._removed.append(key)

    # -- signals -------------------------------------------------------------

    # A signal is recorded by its Python-level handler, in a set: a burst of
    # SIGHUPs is one reload, and a SIGTERM behind them is never lost.  The
    # wake-up fd only wakes the loop; when its buffer is full (a burst), the
    # loop is awake already, so a failed write is no news and stays quiet.

    def add_signal_handler(self, signum: int, handler: Callable[[], None]) -> None:
        """Run `handler` from the loop (not inside the signal) when `signum` arrives."""
        if self._signal_sock is None:
            self._signal_sock, writer = socket.socketpair()
            self._signal_sock.setblocking(False)
            writer.setblocking(False)
            self._signal_writer = writer
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self.add_reader(self._signal_sock, self._on_signal_wakeup)
        self._signal_handlers[signum] = handler
        signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, _frame: Any) -> None:
        self._signals_arrived[signum] = True  # a dict as an ordered set: in the order they came

    def _on_signal_wakeup(self) -> None:
        try:
            while self._signal_sock.recv(4096):
                pass
        except OSError:
            pass  # empty now (EAGAIN)
        while self._signals_arrived:
            signum = next(iter(self._signals_arrived))
            del self._signals_arrived[signum]
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                self.call_guarded(handler, ())

    # -- running -------------------------------------------------------------

    def call_guarded(self, callback: Callable, args: tuple) -> None:
        """Run one callback, then what it asked to run soon; an exception is logged, not raised."""
        try:
            callback(*args)
        except Exception as exc:  # one bad callback must not stop the relay
            self._callback_failed(callback, exc)
        soon = self._soon
        while soon:
            callback, args = soon.popleft()
            try:
                callback(*args)
            except Exception as exc:
                self._callback_failed(callback, exc)

    def _callback_failed(self, callback: Callable, exc: Exception) -> None:
        """Counted and logged at a bounded rate (with the traceback in debug mode)."""
        self.errors.add("callback")
        name = getattr(callback, "__qualname__", repr(callback))
        self.log.every("callback:" + name, ERROR_LOG_INTERVAL_S, "error",
                       "internal error in %s: %s: %s" % (name, type(exc).__name__, exc))
        if self.log.debug_enabled:
            import traceback

            self.log.debug(traceback.format_exc().rstrip())

    def run_once(self, timeout: Optional[float] = None) -> None:
        """Wait at most `timeout` (None: until the next timer) for sockets, then run what is due."""
        heap = self._heap
        if heap:
            until_timer = heap[0][0] - self.time()
            if timeout is None or until_timer < timeout:
                timeout = until_timer if until_timer > 0.0 else 0.0
        ready = self.selector.select(timeout)
        if ready:
            removed = self._removed
            del removed[:]
            for key, _mask in ready:
                if removed and any(key is r for r in removed):
                    continue
                self.call_guarded(key.data, ())
        now = self.time()
        heap = self._heap  # a callback's cancel may have compacted it into a new list
        due = []
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            timer.in_heap = False
            if timer.cancelled:
                self._cancelled_in_heap = max(0, self._cancelled_in_heap - 1)
            else:
                due.append(timer)
        for timer in due:  # a snapshot: timers set now run on the next pass
            if not timer.cancelled:
                self.call_guarded(timer.callback, timer.args)

    def run(self) -> None:
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        if self._signal_sock is not None:
            signal.set_wakeup_fd(-1)
            self._signal_sock.close()
            self._signal_writer.close()
            self._signal_sock = None
        self.selector.close()


# ============================================================================
# Resolver: getaddrinfo off the loop
# ============================================================================
#
# getaddrinfo blocks, for seconds when a resolver is slow or hung.  Each look-up
# runs on its own short-lived daemon thread (at most one per key in flight) and
# hands its result back through a socketpair that the reactor watches, so the
# callback runs on the loop like any other event and forwarding never waits.
# Literal addresses never reach a thread: AI_NUMERICHOST answers them at once.


def split_host_port(text: str) -> Tuple[str, int]:
    """("host", port) of "host:port", "[v6]:port" or ":port"; ValueError if malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError("expected [IPv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets: [addr]:port")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError("port %r is not a number from 0 to 65535" % port)
    return host, int(port)


def system_getaddrinfo(host: str, port: int, family: int = 0, type: int = 0, proto: int = 0,
                       flags: int = 0) -> list:
    """socket.getaddrinfo, with an ASCII host passed as bytes.

    Given a str, getaddrinfo always encodes it with the "idna" codec, which
    imports unicodedata: on OpenWrt that is in python3-codecs, not python3-light.
    """
    try:
        host_arg = host.encode("ascii")  # type: Any
    except UnicodeEncodeError:
        host_arg = host  # a non-ASCII name really needs IDNA
    return socket.getaddrinfo(host_arg, port, family, type, proto, flags)


def host_problem(host: str) -> str:
    """Why `host` can be neither an IP address nor a DNS name, or "" if it can.  A
    non-ASCII name would need the IDNA codec, which OpenWrt's python3-light lacks."""
    if not host:
        return ""
    if not host.isascii() or not host.isprintable() or any(c in host for c in " /\\"):
        return "not a host name (ASCII letters, digits, '-' and '.'; an internationalised name in its xn-- form)"
    if numeric_address(host, 0) is not None:
        return ""
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if len(host) > 253 or not all(0 < len(label) <= 63 for label in labels):
        return "not a host name (labels of 1 to 63 characters, 253 in all)"
    return ""


def source_prefix(sockaddr: tuple) -> bytes:
    """The network a source address belongs to, as rate limits count it: its /24 (IPv4,
    also IPv4-mapped) or /56 (IPv6, a home's usual delegation)."""
    host = sockaddr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    try:
        return socket.inet_pton(socket.AF_INET, host)[:3]
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, host.split("%")[0])[:7]
    except OSError:
        return host.encode()


def numeric_address(host: str, port: int) -> Optional[Tuple[int, tuple]]:
    """(family, sockaddr) if `host` is a literal IP address, else None (needs DNS)."""
    try:
        infos = system_getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, LookupError):
        return None
    return infos[0][0], infos[0][4]


def format_address(sockaddr: Optional[tuple]) -> str:
    """"192.0.2.1:7", "[2001:db8::2]:7"; an IPv4 client of a dual-stack socket as IPv4."""
    if not sockaddr:
        return "-"
    host = sockaddr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    if ":" in host:
        return "[%s]:%d" % (host, sockaddr[1])
    return "%s:%d" % (host, sockaddr[1])


class Resolver:
    """Asynchronous getaddrinfo for the reactor; `getaddrinfo` is injectable for tests."""

    def __init__(self, reactor: Reactor, getaddrinfo: Callable = system_getaddrinfo) -> None:
        self.reactor = reactor
        self.getaddrinfo = getaddrinfo
        self._done = deque()  # type: deque  # (key, callback, result), appended by threads
        self._in_flight = set()  # type: set
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        reactor.add_reader(self._reader, self._deliver)

    def lookup(self, key: Any, host: str, port: int, callback: Callable[[Any], None], family: int = 0) -> bool:
        """Resolve in the background (to `family` only, if not 0); callback((family, sockaddr))
        or callback(OSError) later on the loop.  False if a look-up for `key` is still in flight."""
        if key in self._in_flight:
            return False
        self._in_flight.add(key)
        worker = threading.Thread(target=self._work, args=(key, host, port, callback, family),
                                  name="mpudp-dns", daemon=True)
        worker.start()
        return True

    def _work(self, key: Any, host: str, port: int, callback: Callable, family: int = 0) -> None:
        try:
            infos = self.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
            result = (infos[0][0], infos[0][4]) if infos else OSError("no address")  # type: Any
        except (OSError, UnicodeError, LookupError) as exc:
            result = exc if isinstance(exc, OSError) else OSError(str(exc))
        except Exception as exc:  # a broken resolver library must still answer
            result = OSError("%s: %s" % (type(exc).__name__, exc))
        self._done.append((key, callback, result))
        try:
            self._writer.send(b"\0")
        except OSError:
            pass  # the reader is full, so a wake-up is already pending; or we are closing

    def _deliver(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass
        while self._done:
            key, callback, result = self._done.popleft()
            self._in_flight.discard(key)
            self.reactor.call_guarded(callback, (result,))

    def close(self) -> None:
        self.reactor.remove_reader(self._reader)
        self._reader.close()
        self._writer.close()


# ============================================================================
# Sockets: link sockets, batched sends (GSO), coalesced receives (GRO)
# ============================================================================


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; the soft limit now (0: unknown)."""
    try:
        import resource  # not on every platform
    except ImportError:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 0 if soft == resource.RLIM_INFINITY else soft


def session_budget(fd_limit: int) -> int:
    """How many server sessions (one upstream socket each) fit under `fd_limit`."""
    return max(1, fd_limit - RESERVED_FDS) if fd_limit else 1 << 30


def open_udp_socket(family: int, bind_to: Optional[tuple] = None) -> socket.socket:
    """A non-blocking UDP socket with roomy buffers, bound if asked (IPv6 "::" is dual-stack)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            except OSError:
                pass  # the kernel caps it; the default still works
        if bind_to is not None:
            if family == socket.AF_INET6 and bind_to[0] == "::":
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                except (OSError, AttributeError):
                    pass
            sock.bind(bind_to)
    except BaseException:
        sock.close()
        raise
    return sock


# A link can be made to leave by one uplink: bound to an interface
# (SO_BINDTODEVICE), marked for policy routing (SO_MARK, as mwan3 and
# `ip rule fwmark` use) or bound to a source address.  The option names are
# missing from older Pythons' socket module; these are Linux's values.
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_MARK = getattr(socket, "SO_MARK", 36)
# "Not there (yet)": an interface that is down or gone, an address not assigned
# (an LTE modem that is still dialling).  The link waits and retries; other
# errors (no permission, an unsupported option) will not go away by waiting.
WAITING_ERRNOS = frozenset((errno.ENODEV, errno.ENXIO, errno.EADDRNOTAVAIL, errno.ENETDOWN,
                            errno.EADDRINUSE))
# The kernel has no route for a link's packets now (a route or an address that
# vanished, an interface that is down): the send was refused on the spot, so the
# link is down at once, not after its missed heartbeats.  Link sockets are not
# connected, so these never come from a remote's ICMP error.
UNREACHABLE_ERRNOS = frozenset((errno.ENETUNREACH, errno.EHOSTUNREACH))


class LinkSocketError(OSError):
    """A link's socket option or bind failed: `what` names it; `waiting` if it may work later."""

    def __init__(self, what: str, exc: OSError, hint: str = "") -> None:
        super().__init__(exc.errno, "%s: %s%s" % (what, exc.strerror or exc, hint))
        self.waiting = exc.errno in WAITING_ERRNOS


def open_link_socket(family: int, spec: "LinkConfig") -> socket.socket:
    """A link's own socket (its own source port and NAT mapping), leaving by the interface,
    mark and source address the link's config asks for; LinkSocketError if it cannot."""
    sock = open_udp_socket(family)
    try:
        if spec.bind_interface:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, spec.bind_interface.encode() + b"\0")
            except OSError as exc:
                raise LinkSocketError("bind_interface %s" % spec.bind_interface, exc,
                                      " (binding to an interface needs CAP_NET_RAW)"
                                      if exc.errno in (errno.EPERM, errno.EACCES) else "") from None
        if spec.fwmark:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, spec.fwmark)
            except OSError as exc:
                raise LinkSocketError("fwmark 0x%x" % spec.fwmark, exc, " (SO_MARK needs CAP_NET_ADMIN, or CAP_NET_RAW"
                                      " since Linux 5.17)"
                                      if exc.errno in (errno.EPERM, errno.EACCES) else "") from None
        if spec.bind_addr is not None:
            try:
                sock.bind(spec.bind_addr[2])
            except OSError as exc:
                raise LinkSocketError("bind_addr %s" % spec.bind_addr[0], exc) from None
        else:
            sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def interface_index(name: str) -> int:
    """The interface's index now; 0 if there is no such interface.  An interface that
    is deleted and made again (ppp0, wwan0) gets a new index: a socket bound to the
    old one sends nowhere and must be made again."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


# Segmentation offload (Linux >= 4.18): packets of one size for one address
# leave by one sendmsg with a UDP_SEGMENT control message, and the kernel cuts
# them into ordinary datagrams (on the NIC, or before loopback delivery), so
# the receiver needs nothing.  One system call instead of up to 64: at
# saturation a drain loop finds many packets queued (bench/bench.py: 1200-byte
# relay/direct 0.16x without it, 0.27x with it).
UDP_SEGMENT = 103  # linux/udp.h; the socket module has no name for it
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in older kernels
GSO_MAX_BYTES = 65000  # all segments together: one IP datagram's worth
GSO_AVAILABLE = sys.platform.startswith("linux") and hasattr(socket.socket, "sendmsg")
# A kernel without UDP_SEGMENT, or a segment larger than the path's MTU (GSO does
# not fragment), refuses the batch with one of these: its packets go one by one.
GSO_REFUSED_ERRNOS = frozenset((errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE))


class SendBatch:
    """Sealed packets that leave together: all `seg` bytes long but the last.

    The data paths seal each packet in place at `end` (`room()` is where the next
    payload is received), then `push` it; a batch goes out when the next packet
    does not fit, when it is full, and at the end of every drain (`flush`), so a
    packet never waits for a later one.

    The first packet after `aim` (every drain aims before its first packet)
    leaves at once with a plain sendto, and an appended one uncopied.  At light
    load it is the drain's only packet: it then neither waits for the drain's
    last recv (the EAGAIN) nor pays for the batch's bookkeeping.  The packets
    behind it were queued while it was handled: they are the batch.
    """

    __slots__ = ("buf", "view", "end", "count", "seg", "eager", "enabled", "max_seg", "sock", "addrs",
                 "on_error", "failed", "counters", "full_counter", "sent_bytes", "sent_packets", "gso_sends")

    def __init__(self, counters: Counters, full_counter: str = "tx_full") -> None:
        self.buf = bytearray(GSO_MAX_BYTES + RECV_BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.end = self.count = self.seg = 0
        self.eager = True  # the next packet goes at once
        self.enabled = GSO_AVAILABLE
        self.max_seg = MAX_UDP_PAYLOAD  # lowered when the kernel refuses a segment size
        self.counters = counters
        self.full_counter = full_counter  # counts packets dropped because the socket's buffer was full
        self.sock = None  # type: Optional[socket.socket]
        self.addrs = ()  # type: Sequence[Optional[tuple]]
        # Where a send error is reported.  The data paths pass callbacks that only
        # count it or queue it for control (Reactor.call_soon): never control itself.
        self.on_error = None  # type: Optional[Callable[[OSError], None]]
        self.failed = False  # a send failed since `aim`: the drain stops, and leaves the rest unread
        self.sent_bytes = 0
        self.sent_packets = 0
        self.gso_sends = 0  # batches that left in one call (for tests and the benchmark)

    def aim(self, sock: socket.socket, addrs: Sequence[Optional[tuple]], on_error: Callable[[OSError], None]) -> None:
        """Where the next packets go (each to every address; None: the connected socket's
        peer); sends what was pending first."""
        if self.count:
            self.flush()
        self.sock, self.addrs, self.on_error = sock, addrs, on_error
        self.eager = True
        self.failed = False

    def append(self, payload: memoryview) -> None:
        """Copy a payload in as the next packet (when it is not received in place);
        the first after `aim` is sent from where it is, uncopied."""
        if self.eager:
            self.eager = False
            self._send_one(payload)
            return
        end = self.end
        self.buf[end:end + len(payload)] = payload
        self.push(len(payload))

    def room(self) -> memoryview:
        """Where the next packet's payload is received: after its header, at `end`."""
        start = self.end + HEADER_SIZE
        return self.view[start:start + MAX_DATA_PAYLOAD + 1]

    def push(self, length: int) -> None:
        """The packet of `length` bytes sealed at `end` joins the batch."""
        if self.eager:  # the drain's first packet (at 0: `aim` emptied the batch) goes now
            self.eager = False
            self._send_one(self.view[:length])
            return
        end, seg = self.end, self.seg
        if self.count and (length > seg or self.count == GSO_MAX_SEGMENTS or end + length > GSO_MAX_BYTES):
            self.flush()  # it cannot join: the batch goes, and it starts the next one
            self.buf[:length] = bytes(self.view[end:end + length])  # may overlap: copy first
            end = 0
        if not self.count:
            self.seg = seg = length
        self.count += 1
        self.end = end = end + length
        if (length < seg or not self.enabled or seg > self.max_seg
                or end + seg > GSO_MAX_BYTES or self.count == GSO_MAX_SEGMENTS):
            # A shorter packet ends a batch, a full one goes, or it goes alone anyway.
            # So `end` stays within GSO_MAX_BYTES and room() always holds a whole datagram.
            self.flush()

    def flush(self) -> None:
        """Send the batch (nothing if empty)."""
        count, end = self.count, self.end
        if not count:
            return
        self.count = self.end = 0
        self.eager = False
        packets = self.view[:end]
        if count == 1:
            self._send_one(packets)
            return
        segment_size = [(socket.IPPROTO_UDP, UDP_SEGMENT, SEGMENT_SIZE.pack(self.seg))]
        for addr in self.addrs:
            try:
                self.sock.sendmsg([packets], segment_size, 0, addr)
                self.gso_sends += 1
                self.sent_bytes += end
                self.sent_packets += count
            except BlockingIOError:
                self.counters.add(self.full_counter, count)
            except OSError as exc:
                if exc.errno in GSO_REFUSED_ERRNOS:
                    self._refused(exc, packets, addr)
                else:
                    self._failed(exc)

    def _send_one(self, packet: memoryview) -> None:
        """One packet to every address."""
        for addr in self.addrs:
            self._send_to(packet, addr)

    def _send_to(self, packet: memoryview, addr: Optional[tuple]) -> bool:
        """One packet with a plain sendto (send: the connected peer); False if it failed
        (a full buffer is counted, and is no failure)."""
        try:
            if addr is None:
                self.sock.send(packet)
            else:
                self.sock.sendto(packet, addr)
            self.sent_bytes += len(packet)
            self.sent_packets += 1
        except BlockingIOError:
            self.counters.add(self.full_counter)
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: OSError) -> None:
        self.failed = True
        self.on_error(exc)

    def _refused(self, exc: OSError, packets: memoryview, addr: tuple) -> None:
        """The kernel would not take the batch: remember, and send its packets one by one."""
        self.counters.add("gso_refused")
        if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            self.enabled = False
        self.max_seg = min(self.max_seg, self.seg - 1)
        for start in range(0, len(packets), self.seg):
            if not self._send_to(packets[start:start + self.seg], addr):
                return


SEGMENT_SIZE = struct.Struct("=H")  # UDP_SEGMENT's value: a host-order u16
CONNECTED_PEER = (None,)  # SendBatch.aim's addresses for a connected socket: send(), no address to parse

# GRO_NOTE: receive offload (Linux >= 5.0) is the other half.  A socket with
# UDP_GRO set may be handed several datagrams of one flow at once, one after
# the other in the buffer, with their size in a control message (all that
# size but the last).  The link sockets use it: a batch the other side sent
# with UDP_SEGMENT then costs one receive, and the kernel never cuts it up.
UDP_GRO = 104  # linux/udp.h
GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
GRO_SIZE = struct.Struct("=i")


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced receives on `sock`; False where the kernel or platform cannot."""
    if not GSO_AVAILABLE or not GRO_CMSG_SPACE:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_segment_size(ancdata: list, total: int) -> int:
    """The size of each datagram in a coalesced receive (`total` if it is just one)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_UDP and kind == UDP_GRO and len(data) >= GRO_SIZE.size:
            size = GRO_SIZE.unpack_from(data)[0]
            if 0 < size < total:
                return size
    return total


def family_of(sockaddr: tuple) -> int:
    """AF_INET for an IPv4 address (also IPv4-mapped), else AF_INET6."""
    host = sockaddr[0]
    return socket.AF_INET if "." in host else socket.AF_INET6


def max_datagram_on(families: Sequence[Optional[int]]) -> int:
    """The largest application datagram that crosses a 1500-byte path on each of these families."""
    return min(FITS_1500_IPV4 if family == socket.AF_INET else FITS_1500_IPV6 for family in families)


def ip_udp_headers(family: Optional[int]) -> int:
    return IPV4_UDP_HEADERS if family == socket.AF_INET else IPV6_UDP_HEADERS


def route_mtu(family: int, addr: tuple, interface: str = "") -> int:
    """The MTU towards `addr`, in IP bytes: of `interface` if the link is bound to one,
    else of the route the kernel picks (or a smaller path MTU it has learnt from
    ICMP).  COMMON_PATH_MTU where the system cannot say."""
    try:
        if interface:
            with open("/sys/class/net/%s/mtu" % interface) as mtu_file:
                return int(mtu_file.read())
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)  # no packet: only the route look-up
            return sock.getsockopt(*((socket.IPPROTO_IP, IP_MTU) if family == socket.AF_INET
                                     else (socket.IPPROTO_IPV6, IPV6_MTU)))
    except (OSError, ValueError):
        return COMMON_PATH_MTU


def send_unfragmented(sock: socket.socket, packet, addr: tuple) -> None:
    """Send one path-MTU probe with DF set and no local fragmentation (Linux's
    IP_PMTUDISC_PROBE, for this send only: data keeps the system's setting, which
    fragments rather than drops).  A probe larger than the route's MTU then fails
    here with EMSGSIZE, and one that a router cannot forward is dropped, not cut up."""
    level, option = ((socket.IPPROTO_IP, IP_MTU_DISCOVER) if sock.family == socket.AF_INET
                     else (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER))
    try:
        was = sock.getsockopt(level, option)
        sock.setsockopt(level, option, PMTUDISC_PROBE)
    except OSError:
        was = None  # not Linux: the kernel may fragment the probe, and a black hole is found by data
    try:
        sock.sendto(packet, addr)
    finally:
        if was is not None:
            sock.setsockopt(level, option, was)


class FragmentWarning:
    """Says once that datagrams are too large for a common 1500-byte path after mpudp's
    overhead (they are fragmented, and LTE or CGNAT paths often drop fragments), and
    counts each one."""

    def __init__(self) -> None:
        self.warned = False

    def note(self, n: int, limit: int, counters: Counters, log: Log, source: str) -> None:
        if n <= limit:
            return
        counters.add("over_1500_path")
        if not self.warned:
            self.warned = True
            log.warn("%s sent a %d-byte datagram: over a 1500-byte path only %d fit after mpudp's %d bytes, so "
                     "it is fragmented (and lost where fragments are); lower the application's MTU (WireGuard: "
                     "MTU %d, or %d if every link is IPv4)" % (source, n, limit, OVERHEAD, FITS_1500_IPV6 - 32,
                                                              FITS_1500_IPV4 - 32))


def receive_datagrams(sock: socket.socket, bufs: List[memoryview], view: memoryview, gro: bool):
    """Yield (offset, length, source address) of each datagram waiting on `sock`, received
    into `view` (== bufs[0]); a coalesced receive (GRO_NOTE) yields each of its datagrams.
    Each is valid until the next is asked for.  Ends at EAGAIN; other errors propagate."""
    while True:
        try:
            if gro:
                total, ancdata, _flags, addr = sock.recvmsg_into(bufs, GRO_CMSG_SPACE)
                seg = gro_segment_size(ancdata, total) if ancdata else total
            else:
                total, addr = sock.recvfrom_into(view)
                seg = total
        except BlockingIOError:
            return
        if seg >= total:
            yield 0, total, addr
        else:
            for off in range(0, total, seg):
                yield off, min(seg, total - off), addr


def open_listen_socket(host: str, port: int) -> socket.socket:
    """The socket a client or server listens on; an OSError that names the address."""
    family, sockaddr = listen_address(host, port)
    try:
        return open_udp_socket(family, sockaddr)
    except OSError as exc:
        raise OSError(exc.errno, "%s: %s" % (format_address(sockaddr), exc.strerror or exc)) from None


def listen_address(host: str, port: int) -> Tuple[int, tuple]:
    """(family, sockaddr) to bind for a listen_addr; "" means every address, IPv6 and IPv4.

    Resolved once at start-up (this may block briefly for a host name: nothing
    is forwarding yet)."""
    if host == "":
        if socket.has_ipv6:
            try:
                probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                probe.close()
                return socket.AF_INET6, ("::", port)
            except OSError:
                pass
        return socket.AF_INET, ("0.0.0.0", port)
    found = numeric_address(host, port)
    if found is not None:
        return found
    infos = system_getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
    return infos[0][0], infos[0][4]


class Endpoint:
    """A host:port the relay sends to: resolved off the loop, retried, refreshed.

    A literal address is known at once.  A host name starts unknown; look-ups
    are retried with back-off until one succeeds, then refreshed every
    `refresh_s` (0: never).  A failed refresh keeps the old address and is
    logged once until a look-up succeeds again.
    """

    def __init__(self, text: str, host: str, port: int, on_change: Callable[["Endpoint"], None],
                 want_family: int = 0) -> None:
        self.text = text
        self.host = host
        self.port = port
        self.on_change = on_change
        self.want_family = want_family  # a link bound to an IPv4 (IPv6) address needs one of those
        self.failures = 0
        numeric = numeric_address(host, port)
        self.is_name = numeric is None
        self.family, self.addr = numeric if numeric else (None, None)
        self._retry = None  # type: Optional[Timer]  # the next look-up while none has succeeded
        self._refresh = None  # type: Optional[Periodic]

    def start(self, reactor: Reactor, resolver: Resolver, log: Log, refresh_s: float) -> None:
        self._reactor, self._resolver, self._log = reactor, resolver, log
        if not self.is_name:
            return
        self._lookup()
        if refresh_s > 0:
            self._refresh = reactor.call_every(refresh_s, self._lookup)

    def _lookup(self) -> None:
        self._resolver.lookup(self, self.host, self.port, self._on_result, self.want_family)

    def _on_result(self, result: Any) -> None:
        if isinstance(result, OSError):
            self.failures += 1
            if self.failures == 1:
                self._log.warn("cannot resolve %s: %s; %s" % (
                    self.text, result, "keeping %s" % format_address(self.addr) if self.addr else "retrying"))
            if self.addr is None:
                delay = min(DNS_RETRY_FLOOR_S * 2 ** (min(self.failures, 32) - 1), DNS_RETRY_CEILING_S)
                self._reactor.cancel(self._retry)
                self._retry = self._reactor.call_later(delay, self._lookup)
            return
        self.failures = 0
        family, addr = result
        if addr != self.addr:
            old = self.addr
            self.family, self.addr = family, addr
            self._log.info("%s resolves to %s%s" % (
                self.text, format_address(addr), " (was %s)" % format_address(old) if old else ""))
            self.on_change(self)

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        self._refresh = None
        if self._retry is not None:
            self._retry.cancel()
        self._retry = None


# ============================================================================
# Client
# ============================================================================
#
# The client is five objects, and each fact has one owner:
#
# - ClientDataPath is the packet path: the listen socket, the buffers, the
#   batches and the sessions.  Its drains read `route` and `epoch` and never
#   set them.  What needs a decision (a handshake answer, an echo, a send
#   error) goes to control by Reactor.call_soon, so it runs after the drain
#   has flushed, and a drain never sees its own state change under it.
# - ClientHandshake runs HELLO / COOKIE / WELCOME and makes the next Epoch.
# - LinkMonitor owns every heartbeat and heartbeat-timeout timer; it says
#   when a link comes up or goes down.
# - Steering is the one place that decides where data goes: from the links'
#   health it picks the active link and publishes a Route.
# - Client wires them together: start, close, reload, status, score file.
#
# The packet path, application -> link -> application, is
# ClientDataPath.on_local_readable and ClientDataPath.on_link_readable.


def recovery_hold_s(config: "ClientConfig") -> float:
    """How long a link that came back must keep answering before it is steady."""
    return (RECOVERY_ANSWERS - 1) * config.heartbeat_interval_s


class ClientLink:
    """One path to the server: its endpoint, its socket and its measurements."""

    def __init__(self, index: int, spec: "LinkConfig", on_address_change: Callable[[Endpoint], None],
                 max_consecutive_fail: int, recovery_hold_s: float) -> None:
        self.index = index
        self.spec = spec
        self.endpoint = Endpoint(spec.remote_addr, spec.host, spec.port, on_address_change,
                                 spec.bind_addr[1] if spec.bind_addr else 0)
        self.health = LinkHealth(max_consecutive_fail, recovery_hold_s=recovery_hold_s)
        self.meter = ThroughputMeter()
        self.sock = None  # type: Optional[socket.socket]
        self.ifindex = 0  # of bind_interface when the socket was made
        self.waiting = ""  # why the link has no socket yet ("" if it has one, or no address yet)
        self.gro = False  # its socket takes coalesced receives (GRO_NOTE)
        self.on_send_error = None  # type: Optional[Callable[[OSError], None]]  # what the data path reports to
        self.tx_bytes = self.tx_packets = 0  # what went out and came in on this link, data and control
        self.rx_bytes = self.rx_packets = 0
        self.data_sent = self.data_received = 0  # DATA only, copies included: what heartbeats report
        self.liveness = DataLiveness()
        self.pmtu = PathMtuSearch(MAX_UDP_PAYLOAD, ip_udp_headers(socket.AF_INET))  # PathProber sets it
        # Aggregation: what it carries each way, its least RTT, and the counts at its last echo.
        self.rate_up, self.rate_down = LinkRate(), LinkRate()
        self.least_rtt = RecentMin(MIN_RTT_MEMORY_S)
        self.up_queue_s = 0.0  # the last echo's: how much of the RTT is a queue towards the server
        self.counts_at_echo = None  # type: Optional[Tuple[float, int, int, int, int, int, int]]
        self.switches = 0  # times this link became the active one

    @property
    def name(self) -> str:
        return "link %d (%s)" % (self.index, self.endpoint.text)

    @property
    def priority(self) -> float:
        return self.spec.priority

    @property
    def addr(self) -> Optional[tuple]:
        return self.endpoint.addr

    @property
    def one_way_delay_s(self) -> float:
        """Half its least RTT (its queue is the Spreader's to estimate)."""
        least = self.least_rtt.value()
        return least / 2 if least is not None else (self.health.srtt or 0.0) / 2

    def open_socket(self) -> None:
        """Make the link's socket; LinkSocketError if its options cannot be applied (now).
        `ifindex` is 0 afterwards if bind_interface went away meanwhile."""
        self.sock = open_link_socket(self.endpoint.family, self.spec)
        self.ifindex = interface_index(self.spec.bind_interface) if self.spec.bind_interface else 0
        self.gro = enable_gro(self.sock)

    def close_socket(self, reactor: Reactor) -> None:
        if self.sock is not None:
            reactor.remove_reader(self.sock)
            self.sock.close()
            self.sock = None

    def mtu_ceiling(self) -> int:
        """The largest datagram its route's interface sends (PathMtuSearch's ceiling)."""
        family = self.endpoint.family
        if self.addr is None:
            return MAX_UDP_PAYLOAD  # no address yet: searched again when it comes
        return min(MAX_UDP_PAYLOAD, route_mtu(family, self.addr, self.spec.bind_interface) - ip_udp_headers(family))

    def send(self, packet: memoryview, counters: Counters, unfragmented: bool = False) -> Optional[OSError]:
        """Send one control packet; the error if the kernel refused it (a full buffer is only counted)."""
        try:
            if unfragmented:
                send_unfragmented(self.sock, packet, self.endpoint.addr)
            else:
                self.sock.sendto(packet, self.endpoint.addr)
        except BlockingIOError:
            counters.add("tx_full")
        except OSError as exc:
            return exc
        else:
            self.tx_bytes += len(packet)
            self.tx_packets += 1
        return None


class Route:
    """Where data goes now: the carrying links (the active one first) and the flags
    each data packet carries (ACTIVE, and COPIES with redundancy).  Immutable:
    Steering makes a new one, and a drain uses the one current when it starts.

    `watch_above`: a datagram larger than this leaves the drain's fast path, to be
    noted (a link is known not to carry it, or it will be fragmented);
    `carried_up_to`: the largest datagram every carrier is known to pass."""

    __slots__ = ("carriers", "data_flags", "watch_above", "carried_up_to", "spread")

    def __init__(self, carriers: Tuple[ClientLink, ...] = (), watch_above: int = FITS_1500_IPV6,
                 carried_up_to: int = MAX_DATA_PAYLOAD, spread: bool = False) -> None:
        self.carriers = carriers
        self.data_flags = TYPE_DATA | FLAG_ACTIVE | (max(0, len(carriers) - 1) << COPIES_SHIFT)
        self.watch_above = watch_above
        self.carried_up_to = carried_up_to
        self.spread = spread and len(carriers) > 1  # aggregate: each packet on one carrier (Spreader)

    def same_as(self, other: "Route") -> bool:
        return (self.carriers, self.watch_above, self.carried_up_to, self.spread) == (
            other.carriers, other.watch_above, other.carried_up_to, other.spread)

    def heartbeat_flags(self, link: ClientLink) -> int:
        """ACTIVE, with the number of copies, on the links data goes out on: where the
        server sends replies (PROTOCOL.md, "Return path")."""
        return TYPE_HEARTBEAT | (self.data_flags & (FLAG_ACTIVE | COPIES_MASK) if link in self.carriers else 0)


class ClientSession:
    """One local application (source ip, port) and its session id on the wire."""

    __slots__ = ("id", "addr", "targets", "packets", "seen_packets", "last_active")

    def __init__(self, session_id: int, addr: tuple, now: float) -> None:
        self.id = session_id
        self.addr = addr
        self.targets = (addr,)  # as SendBatch.aim takes it
        self.packets = 0
        self.seen_packets = 0
        self.last_active = now


class ClientControl:
    """What the client's data path reports to; each call comes after the drain that saw it."""

    def on_handshake_packet(self, link: ClientLink, packet: bytes) -> None: ...
    def on_echo(self, link: ClientLink, seq: int, bitmap: int, server_rx: int, server_tx: int,
                largest_reply: int, up_queue_ms: int) -> None: ...
    def on_challenge(self, link: ClientLink, token: int) -> None: ...
    def on_send_error(self, link: ClientLink, exc: OSError) -> None: ...
    def on_probe_ack(self, link: ClientLink, probe_id: int, size: int) -> None: ...
    def on_large_datagram(self) -> None: ...  # larger than a link is known to carry: steer again
    def on_reorder_waiting(self) -> None: ...  # early packets wait (aggregate): a timer for them


class ClientDataPath:
    """Local applications in, sealed packets out on the route's links, replies back.

    Reads `route` and `epoch`, which only control sets; owns the listen socket,
    the buffers, the batches and the sessions.
    """

    def __init__(self, config: "ClientConfig", reactor: Reactor, log: Log, counters: Counters,
                 control: ClientControl) -> None:
        self.config = config
        self.reactor = reactor
        self.log = log
        self.counters = counters
        self.control = control
        self.route = Route()
        self.epoch = None  # type: Optional[Epoch]
        self.listen_sock = None  # type: Optional[socket.socket]
        self.sessions_by_addr = {}  # type: Dict[tuple, ClientSession]
        self.sessions_by_id = {}  # type: Dict[int, ClientSession]
        # Random first id: after a restart, new sessions do not land on the
        # server's not-yet-expired sessions of the previous run.
        self._next_session_id = 1 + int.from_bytes(os.urandom(4), "big") % 0xFFFFFFFE
        self._buf = bytearray(RECV_BUFFER_SIZE)  # received packets, and copies sealed one by one
        self._view = memoryview(self._buf)
        self._bufs = [self._view]  # for recvmsg_into
        self._batch = SendBatch(self.counters)  # packets for one link, sealed in place
        self._app_batch = SendBatch(self.counters, "local_full")  # payloads for one local application
        self._app_batch_session = None  # type: Optional[ClientSession]
        self.fragmented = FragmentWarning()
        # The largest datagrams lately, each way: from the applications (those above
        # route.watch_above only) and the server's replies (its echoes say).
        self.largest_sent = RecentMax(LARGE_DATA_MEMORY_S)
        self.largest_received = RecentMax(LARGE_DATA_MEMORY_S)
        # Aggregate: the scheduler for what goes up, the order for what comes down.
        self.spreader = Spreader()
        self.spread_choices = []  # type: List[Tuple[ClientLink, float, float]]  # made by refresh_spread
        self._spread_route = None  # type: Optional[Route]  # the route they were made for
        self.reorder = ReorderBuffer(1) if config.aggregate else None  # type: Optional[ReorderBuffer]
        self._released = []  # type: List[Tuple[int, bytes]]

    def open(self) -> None:
        self.listen_sock = open_listen_socket(self.config.listen_host, self.config.listen_port)
        self.reactor.add_reader(self.listen_sock, self.on_local_readable)

    def close(self) -> None:
        if self.listen_sock is not None:
            self.reactor.remove_reader(self.listen_sock)
            self.listen_sock.close()
            self.listen_sock = None

    def watch(self, link: ClientLink) -> None:
        """Read the link's (new) socket."""
        self.reactor.add_reader(link.sock, lambda: self.on_link_readable(link))

    # -- application -> link ---------------------------------------------------

    def on_local_readable(self) -> None:
        carriers, epoch = self.route.carriers, self.epoch
        if epoch is None or not carriers:
            self._drain_without_route()
        elif len(carriers) == 1:
            self._send_on_one_link(carriers[0], epoch)
        elif self.route.spread:
            self._send_spread(epoch)
        else:
            self._send_copies(carriers, epoch)

    def _send_on_one_link(self, link: ClientLink, epoch: Epoch) -> None:
        """Each packet is sealed in place in the batch, and they leave together (SendBatch)."""
        # Locals instead of attribute look-ups: this loop runs once per datagram.
        sock, sessions, session_for = self.listen_sock, self.sessions_by_addr, self._session_for
        pack_header, flags, watch_above = HEADER.pack_into, self.route.data_flags, self.route.watch_above
        client_id, link_index = self.config.client_id, link.index
        batch = self._batch
        buf, view = batch.buf, batch.view
        batch.aim(link.sock, (link.endpoint.addr,), link.on_send_error)
        bytes_before, packets_before = batch.sent_bytes, batch.sent_packets
        # After a send error the rest stays unread: control hears of it once this drain
        # is over, and may move the route (a link without a route any more).
        while not batch.failed:
            try:
                n, addr = sock.recvfrom_into(batch.room())
            except BlockingIOError:
                break
            except OSError as exc:
                self._socket_error(exc)
                break
            session = sessions.get(addr)
            if session is None or n > watch_above:
                session = session_for(addr, n)  # a new application, or a large datagram
                if session is None:
                    continue
            else:
                session.packets += 1
            epoch.tx_seq += 1
            start = batch.end
            end = start + HEADER_SIZE + n
            pack_header(buf, start, flags, link_index, client_id, session.id, epoch.nonce_base | epoch.tx_seq)
            m = epoch.tx_mac.copy()
            m.update(view[start:end])
            buf[end:end + MAC_SIZE] = m.digest()
            batch.push(n + OVERHEAD)
        batch.flush()
        link.tx_bytes += batch.sent_bytes - bytes_before
        link.tx_packets += batch.sent_packets - packets_before
        link.data_sent += batch.sent_packets - packets_before

    def _send_copies(self, carriers: Tuple[ClientLink, ...], epoch: Epoch) -> None:
        """Redundancy: one sequence number for all copies, so the server takes the first to
        arrive and its replay window drops the others.  Each copy names its own link, so
        each has its own MAC, and is sealed and sent on its own."""
        flags, client_id, mac, buf = self.route.data_flags, self.config.client_id, epoch.tx_mac, self._buf
        for session, n in self._waiting_datagrams():
            nonce = epoch.next_nonce()
            for link in carriers:
                self._send_sealed(link, seal_into(buf, mac, flags, link.index, client_id, session.id, nonce, n))

    def _send_spread(self, epoch: Epoch) -> None:
        """Aggregate: each packet on the carrier where it would arrive first (Spreader),
        sealed and sent on its own."""
        # As in _send_on_one_link, this loop runs once per datagram: locals, the known
        # session looked up and the packet sealed inline (seal_into, _send_sealed).
        sock, sessions, session_for = self.listen_sock, self.sessions_by_addr, self._session_for
        pack_header, flags, watch_above = HEADER.pack_into, self.route.data_flags, self.route.watch_above
        client_id, counters, buf, view = self.config.client_id, self.counters, self._buf, self._view
        payload_room = view[HEADER_SIZE:HEADER_SIZE + MAX_DATA_PAYLOAD + 1]
        choices = self.spread_choices if self._spread_route is self.route else self.refresh_spread()
        pick, now = self.spreader.pick, self.reactor.time()
        while True:
            try:
                n, addr = sock.recvfrom_into(payload_room)
            except BlockingIOError:
                return
            except OSError as exc:
                self._socket_error(exc)
                return
            session = sessions.get(addr)
            if session is None or n > watch_above:
                session = session_for(addr, n)  # a new application, or a large datagram
                if session is None:
                    continue
            else:
                session.packets += 1
            end = HEADER_SIZE + n
            link = pick(choices, end + MAC_SIZE, now)
            epoch.tx_seq += 1
            pack_header(buf, 0, flags, link.index, client_id, session.id, epoch.nonce_base | epoch.tx_seq)
            m = epoch.tx_mac.copy()
            m.update(view[:end])
            buf[end:end + MAC_SIZE] = m.digest()
            try:
                link.sock.sendto(view[:end + MAC_SIZE], link.endpoint.addr)
            except BlockingIOError:
                counters.add("tx_full")
            except OSError as exc:
                link.on_send_error(exc)
                return  # control moves the route; the rest waits for the next drain
            else:
                link.tx_bytes += end + MAC_SIZE
                link.tx_packets += 1
                link.data_sent += 1

    def refresh_spread(self) -> List[Tuple[ClientLink, float, float]]:
        """The Spreader's view of the carriers, (link, rate up, one-way delay) each: made
        again when the route changes and after each evaluation (control calls this once
        the estimates have moved), not in every drain."""
        route = self.route
        self.spread_choices = [(link, link.rate_up.rate, link.one_way_delay_s) for link in route.carriers]
        self._spread_route = route
        return self.spread_choices

    def _drain_without_route(self) -> None:
        """No epoch or no link to send on (yet, or any more): read and count, so the socket
        does not wake the loop again for the same packets."""
        for _session, _n in self._waiting_datagrams():
            self.counters.add("no_path")

    def _waiting_datagrams(self):
        """(session, length) of each datagram waiting on the listen socket, its payload
        received at self._buf[HEADER_SIZE:]; those dropped (_session_for) are not yielded."""
        sock, session_for = self.listen_sock, self._session_for
        payload_room = self._view[HEADER_SIZE:HEADER_SIZE + MAX_DATA_PAYLOAD + 1]
        while True:
            try:
                n, addr = sock.recvfrom_into(payload_room)
            except BlockingIOError:
                return
            except OSError as exc:
                self._socket_error(exc)
                return
            session = session_for(addr, n)
            if session is not None:
                yield session, n

    def _send_sealed(self, link: ClientLink, length: int) -> bool:
        """Send the DATA packet sealed at the start of the buffer on `link`; False if the
        kernel refused it (reported to control), True if it left or the buffer was full."""
        try:
            link.sock.sendto(self._view[:length], link.endpoint.addr)
        except BlockingIOError:
            self.counters.add("tx_full")
        except OSError as exc:
            link.on_send_error(exc)
            return False
        else:
            link.tx_bytes += length
            link.tx_packets += 1
            link.data_sent += 1
        return True

    def _session_for(self, addr: tuple, n: int) -> Optional[ClientSession]:
        """The session of a datagram of `n` bytes from `addr` (opened if new), or None if it is dropped."""
        if n > FITS_1500_IPV6:
            if n > MAX_DATA_PAYLOAD:
                self.counters.add("oversize")
                return None
            families = [link.endpoint.family for link in self.route.carriers] or [socket.AF_INET6]
            self.fragmented.note(n, max_datagram_on(families), self.counters, self.log, "an application")
        if n > self.route.watch_above:
            self._note_large(n)
        session = self.sessions_by_addr.get(addr)
        if session is None:
            session = self._open_session(addr)
            if session is None:
                return None
        session.packets += 1
        return session

    def _note_large(self, n: int) -> None:
        """A datagram larger than some link is known to carry: steering hears of a new
        largest size at once, and one the carriers cannot pass is counted (it is sent
        all the same: when no link carries it, Steering has said so in the log)."""
        if n > self.largest_sent.current:
            self.largest_sent.note(n)
            self.reactor.call_soon(self.control.on_large_datagram)
        if n > self.route.carried_up_to:
            self.counters.add("over_path_mtu")

    def largest_datagram(self, now: float) -> int:
        """The largest application datagram lately, either way, that steering must place."""
        return max(self.largest_sent.value(now), self.largest_received.value(now))

    def _open_session(self, addr: tuple) -> Optional[ClientSession]:
        if len(self.sessions_by_addr) >= self.config.max_sessions:
            self.counters.add("session_limit")
            self.log.every("session-limit", ERROR_LOG_INTERVAL_S, "warn",
                           "max_sessions (%d) reached: refusing %s" % (self.config.max_sessions,
                                                                      format_address(addr)))
            return None
        session_id = self._next_session_id
        while session_id in self.sessions_by_id or session_id == 0:
            session_id = (session_id + 1) & 0xFFFFFFFF
        self._next_session_id = (session_id + 1) & 0xFFFFFFFF
        session = ClientSession(session_id, addr, self.reactor.time())
        self.sessions_by_addr[addr] = session
        self.sessions_by_id[session_id] = session
        self.log.debug("session %08x opened for %s" % (session_id, format_address(addr)))
        return session

    def expire_sessions(self, now: float) -> None:
        """Forget the sessions that were silent for session_timeout_sec."""
        timeout = self.config.session_timeout_s
        for session in list(self.sessions_by_id.values()):
            if session.packets != session.seen_packets:
                session.seen_packets = session.packets
                session.last_active = now
            elif now - session.last_active >= timeout:
                del self.sessions_by_id[session.id]
                del self.sessions_by_addr[session.addr]
                self.log.debug("session %08x for %s expired" % (session.id, format_address(session.addr)))

    # -- link -> application ---------------------------------------------------

    def on_link_readable(self, link: ClientLink) -> None:
        # Payloads for the applications are gathered, a batch per session in a
        # row, and sent when the drain ends.
        try:
            self._drain_link(link)
        finally:
            self._app_batch.flush()
            self._app_batch_session = None

    def _drain_link(self, link: ClientLink) -> None:
        buf, view = self._buf, self._view
        client_id, counters, call_soon = self.config.client_id, self.counters, self.reactor.call_soon
        epoch, reorder = self.epoch, self.reorder
        try:
            for off, n, _addr in receive_datagrams(link.sock, self._bufs, view, link.gro):
                if n < OVERHEAD:
                    counters.add("short")
                    continue
                type_flags, link_index, packet_client, session_id, nonce = HEADER.unpack_from(buf, off)
                kind = type_flags & TYPE_MASK
                if packet_client != client_id:
                    counters.add("bad_header")
                elif kind == TYPE_WELCOME or kind == TYPE_COOKIE:
                    call_soon(self.control.on_handshake_packet, link, bytes(view[off:off + n]))
                elif epoch is None or nonce >> SEQ_BITS != epoch.tag:
                    counters.add("stale_epoch")
                else:
                    drop = epoch.open(view, off, n, nonce & SEQ_MASK)
                    if drop:
                        counters.add(drop)
                        if drop == "duplicate" and kind == TYPE_DATA and epoch.authentic(view, off, n):
                            link.data_received += 1  # the other copy came first: this link carried it too
                        continue
                    link.rx_bytes += n
                    link.rx_packets += 1
                    if reorder is not None and not reorder.in_order(nonce & SEQ_MASK, link.index, kind == TYPE_DATA):
                        self._arrive_early(link, kind, nonce & SEQ_MASK, session_id,
                                           view[off + HEADER_SIZE:off + n - MAC_SIZE])
                        if kind == TYPE_DATA:
                            continue
                    if kind == TYPE_DATA:
                        link.data_received += 1
                        self._deliver(session_id, view[off + HEADER_SIZE:off + n - MAC_SIZE])
                    elif link_index != link.index:
                        counters.add("wrong_link")  # an echo or challenge copied onto another link's socket
                    elif kind == TYPE_ECHO and n == OVERHEAD + ECHO_PAYLOAD.size:
                        call_soon(self.control.on_echo, link, *ECHO_PAYLOAD.unpack_from(buf, off + HEADER_SIZE))
                    elif kind == TYPE_CHALLENGE and n == OVERHEAD + PATH_TOKEN.size:
                        call_soon(self.control.on_challenge, link, PATH_TOKEN.unpack_from(buf, off + HEADER_SIZE)[0])
                    elif kind == TYPE_PROBE_ACK and n >= OVERHEAD + PROBE_PAYLOAD.size:
                        call_soon(self.control.on_probe_ack, link, PROBE_PAYLOAD.unpack_from(buf, off + HEADER_SIZE)[0],
                                  n)
                    else:
                        counters.add("bad_type")
        except OSError as exc:  # e.g. ECONNREFUSED reported for an earlier send
            call_soon(self.control.on_send_error, link, exc)
        if reorder is not None and reorder.held:
            call_soon(self.control.on_reorder_waiting)

    def _arrive_early(self, link: ClientLink, kind: int, seq: int, session_id: int, payload: memoryview) -> None:
        """Aggregate: a packet out of order.  DATA waits in the ReorderBuffer (copied), or
        goes out late; a control packet only takes its place in the order."""
        released = self._released
        item = None
        if kind == TYPE_DATA:
            link.data_received += 1
            item = (session_id, bytes(payload))
        self.reorder.arrive(seq, link.index, item, self.reactor.time(), released)
        self._deliver_released()

    def _deliver_released(self) -> None:
        for session_id, payload in self._released:
            self._deliver(session_id, memoryview(payload))
        del self._released[:]

    def expire_reorder(self) -> None:
        """The hold of the oldest early packet is over: deliver what may go (a timer)."""
        if self.reorder is not None:
            self.reorder.expire(self.reactor.time(), self._released)
            try:
                self._deliver_released()
            finally:
                self._app_batch.flush()
                self._app_batch_session = None

    def _deliver(self, session_id: int, payload: memoryview) -> None:
        session = self.sessions_by_id.get(session_id)
        if session is None:
            self.counters.add("no_session")
            return
        session.packets += 1
        batch = self._app_batch
        if session is not self._app_batch_session:
            batch.aim(self.listen_sock, session.targets, self._socket_error)
            self._app_batch_session = session
        batch.append(payload)

    def _socket_error(self, exc: OSError) -> None:
        self.counters.add("listen_errors")
        self.log.every("socket-error:listen", ERROR_LOG_INTERVAL_S, "warn", "listen socket: %s" % exc)


class ClientHandshake:
    """HELLO / COOKIE / WELCOME on every link until one WELCOME makes a new Epoch.

    A HELLO is repeated, soon at first then every heartbeat interval, on every
    link with a socket.  The same nonce goes out a few times, so a WELCOME
    slower than one retry still matches, then a new one.
    """

    def __init__(self, reactor: Reactor, log: Log, counters: Counters, static: StaticKeys, client_id: int,
                 links: Callable[[], Sequence[ClientLink]], on_epoch: Callable[[Epoch], None]) -> None:
        self.reactor = reactor
        self.log = log
        self.counters = counters
        self.static = static
        self.client_id = client_id
        self.links = links
        self.on_epoch = on_epoch
        self.retry_ceiling_s = 1.0  # the heartbeat interval, set by the Client
        self.nonce = None  # type: Optional[bytes]  # None: no handshake under way
        self.done_nonce = None  # type: Optional[bytes]  # the nonce of the running epoch's handshake
        self.avoid_tag = -1  # the running epoch's tag: a new epoch must differ
        self._cookies = {}  # type: Dict[ClientLink, bytes]  # the server's cookie for `nonce`, per path
        self._tries = 0
        self._timer = None  # type: Optional[Timer]

    @property
    def under_way(self) -> bool:
        return self.nonce is not None

    def start(self, avoid_tag: int = -1) -> None:
        """Agree a new epoch (at start, when every link went silent, before the counter wraps)."""
        if self.nonce is not None:
            return
        self.avoid_tag = avoid_tag
        self._new_nonce()
        self._tries = 0
        self._send_all()

    def close(self) -> None:
        self.reactor.cancel(self._timer)
        self._timer = None

    def _new_nonce(self) -> None:
        nonce = os.urandom(NONCE_SIZE)
        while epoch_tag(nonce) == self.avoid_tag:
            nonce = os.urandom(NONCE_SIZE)
        self.nonce = nonce
        self._cookies = {}  # a cookie is good for one nonce only

    def _send_all(self) -> None:
        self._timer = None
        self._tries += 1
        if self._tries == HELLO_TRIES_BEFORE_WARNING:
            self.log.warn("no answer from the server to %d handshakes on any link: is it running, and do "
                          "server_public_key and the server's client_public_keys[%d] match these keys?" % (
                              self._tries - 1, self.client_id))
        if self._tries % HELLO_TRIES_PER_NONCE == 0:
            # Then a new nonce, in case the server cannot take this one (its tag
            # may equal the server's epoch of our previous run).
            self._new_nonce()
        for link in self.links():
            self.send_on(link)
        retry_s = min(HELLO_FIRST_RETRY_S * 2 ** (self._tries - 1), self.retry_ceiling_s)
        self._timer = self.reactor.call_later(retry_s, self._send_all)

    def send_on(self, link: ClientLink) -> None:
        """A HELLO on one link (one that just got its socket, or a COOKIE's answer)."""
        if link.sock is None or self.nonce is None:
            return
        packet = seal(self.static.hello_mac, TYPE_HELLO, link.index, self.client_id, 0,
                      handshake_nonce(epoch_tag(self.nonce)),
                      HELLO_PAYLOAD.pack(self.nonce, self._cookies.get(link, bytes(NONCE_SIZE))))
        exc = link.send(memoryview(packet), self.counters)
        if exc is not None:
            link.on_send_error(exc)

    def on_packet(self, link: ClientLink, packet: bytes) -> None:
        """A WELCOME or COOKIE from the server (the data path checked its client id only)."""
        if len(packet) != OVERHEAD + WELCOME_PAYLOAD.size:
            self.counters.add("stale_welcome")
            return
        if not verify(self.static.welcome_mac, packet, len(packet)):
            self.counters.add("auth")
            return
        version = HEADER.unpack_from(packet)[4] & SEQ_MASK
        if version != PROTOCOL_VERSION:
            self.counters.add("old_version")
            self.log.every("server-version", VERSION_LOG_INTERVAL_S, "error", (
                "the server answers in wire protocol version %d, this client speaks %d: run the same mpudp "
                "version on both ends" % (version or 1, PROTOCOL_VERSION)))
            return
        client_nonce, value = WELCOME_PAYLOAD.unpack_from(packet, HEADER_SIZE)
        if client_nonce == self.done_nonce:
            return  # the other links' answers to the HELLO that made the epoch: expected, not a drop
        if client_nonce != self.nonce:
            self.counters.add("stale_welcome")
        elif packet[0] & TYPE_MASK == TYPE_COOKIE:
            self._on_cookie(link, value)
        else:
            self._on_welcome(client_nonce, value)

    def _on_cookie(self, link: ClientLink, cookie: bytes) -> None:
        """The server wants proof that our HELLO is fresh: send it again, with the cookie, at once."""
        if cookie == self._cookies.get(link):
            self.counters.add("stale_welcome")  # a copy: one HELLO per cookie is enough
            return
        self._cookies[link] = cookie
        self.send_on(link)

    def _on_welcome(self, client_nonce: bytes, server_nonce: bytes) -> None:
        epoch = Epoch(self.static.secret, client_nonce, server_nonce, is_client=True)
        self.nonce, self.done_nonce = None, client_nonce
        self.close()
        self.log.info("handshake done: epoch %04x" % epoch.tag)
        self.on_epoch(epoch)


class LinkMonitor:
    """The links' heartbeats: when each is sent, when each times out, what the echoes say.

    Every link is probed every heartbeat interval; after a first miss, at once and
    then every half timeout (LinkHealth's essay).  The monitor owns every heartbeat
    and timeout timer, and reports a link that comes up or goes down.
    """

    def __init__(self, reactor: Reactor, counters: Counters, client_id: int, data: ClientDataPath,
                 on_up: Callable[[ClientLink], None], on_down: Callable[[ClientLink], None],
                 on_never_answered: Callable[[ClientLink], None] = lambda link: None,
                 on_data_lost: Callable[[ClientLink], None] = lambda link: None,
                 on_counts: Callable[..., None] = lambda *counts: None) -> None:
        self.reactor = reactor
        self.counters = counters
        self.client_id = client_id
        self.data = data  # read only: the epoch to seal with, the route for the ACTIVE flag
        self.on_up = on_up
        self.on_down = on_down
        self.on_never_answered = on_never_answered
        self.on_data_lost = on_data_lost
        self.on_counts = on_counts  # (link, its counts at the heartbeat, the server's, now): aggregation
        # What a carrying link's heartbeat says of spreading (aggregation): rate, delay, hold.
        self.spread_fields = lambda link: (0, 0, 0)  # type: Callable[[ClientLink], Tuple[int, int, int]]
        self.interval_s = 1.0  # heartbeat_interval_sec, set by the Client
        self._beats = {}  # type: Dict[ClientLink, _LinkBeats]
        self._ctl = bytearray(OVERHEAD + HEARTBEAT_PAYLOAD.size)

    def beat_at(self, link: ClientLink, when: float) -> None:
        """The link's next heartbeat goes at `when` (sooner or later than planned)."""
        beats = self._beats.get(link)
        if beats is None:
            beats = self._beats[link] = _LinkBeats()
        self.reactor.cancel(beats.timer)
        beats.next_at = when
        beats.timer = self.reactor.call_at(when, self._tick, link)

    def beat_now(self, link: ClientLink) -> None:
        self.beat_at(link, self.reactor.time())

    def watching(self, link: ClientLink) -> bool:
        return link in self._beats

    def forget(self, link: ClientLink) -> None:
        """A removed link: none of its timers fires any more."""
        beats = self._beats.pop(link, None)
        if beats is not None:
            self.reactor.cancel(beats.timer)
            for timer in beats.timeouts.values():
                self.reactor.cancel(timer)

    def close(self) -> None:
        for link in list(self._beats):
            self.forget(link)

    def _tick(self, link: ClientLink) -> None:
        now = self.reactor.time()
        beats = self._beats[link]
        self._send(link, beats, now)
        health = link.health
        interval = self.interval_s
        if health.up and health.consecutive_fail:  # a link that just missed: probe faster
            interval = min(interval, health.timeout() / 2)
        self.beat_at(link, max(beats.next_at + interval, now))

    def _send(self, link: ClientLink, beats: "_LinkBeats", now: float) -> None:
        epoch = self.data.epoch
        if epoch is None or link.sock is None:
            return
        beats.seq = seq = beats.seq % 0xFFFFFFFF + 1
        ctl = self._ctl
        route = self.data.route
        rate_kbps, delay, hold_ms = self.spread_fields(link) if route.spread and link in route.carriers else (0, 0, 0)
        HEARTBEAT_PAYLOAD.pack_into(ctl, HEADER_SIZE, seq, rate_kbps, link.data_sent & COUNT_MASK,
                                    link.data_received & COUNT_MASK, delay, hold_ms, int(now * 1000) & COUNT_MASK)
        length = seal_into(ctl, epoch.tx_mac, route.heartbeat_flags(link), link.index, self.client_id,
                           0, epoch.next_nonce(), HEARTBEAT_PAYLOAD.size)
        link.health.on_sent(seq, now)
        beats.timeouts[seq] = self.reactor.call_at(now + link.health.timeout(), self._timed_out, link, seq)
        beats.data_sent_at[seq] = (link.data_sent, link.tx_bytes, now)
        exc = link.send(memoryview(ctl)[:length], self.counters)
        if exc is not None:
            link.on_send_error(exc)

    def _timed_out(self, link: ClientLink, seq: int) -> None:
        beats = self._beats[link]
        del beats.timeouts[seq]
        beats.data_sent_at.pop(seq, None)
        now = self.reactor.time()
        health = link.health
        went_down = health.on_timeout(seq, now)
        if health.up and health.consecutive_fail == 1 and beats.next_at - now > health.timeout() / 2:
            self.beat_now(link)  # first miss: probe at once, then fast
        if went_down:
            self.on_down(link)
        elif health.last_answer_at is None and health.consecutive_fail == NEVER_ANSWERED_HEARTBEATS:
            self.on_never_answered(link)

    def on_echo(self, link: ClientLink, seq: int, bitmap: int, server_rx: int, server_tx: int) -> None:
        beats = self._beats.get(link)
        if beats is None:
            return  # the link was removed by a reload
        self.reactor.cancel(beats.timeouts.pop(seq, None))
        now = self.reactor.time()
        at_heartbeat = beats.data_sent_at.pop(seq, None)
        if link.health.on_echo(seq, bitmap, now):
            self.on_up(link)
        if at_heartbeat is None:
            return
        data_sent, tx_bytes, sent_at = at_heartbeat
        if link.liveness.on_echo(data_sent, link.data_received, server_rx, server_tx, now):
            self.on_data_lost(link)
        self.on_counts(link, data_sent, tx_bytes, sent_at, server_rx, server_tx, now)


class _LinkBeats:
    """One link's heartbeat counter and timers (LinkMonitor's own)."""

    __slots__ = ("seq", "next_at", "timer", "timeouts", "data_sent_at")

    def __init__(self) -> None:
        self.seq = 0
        self.next_at = 0.0
        self.timer = None  # type: Optional[Timer]
        self.timeouts = {}  # type: Dict[int, Timer]  # heartbeat seq -> its timeout
        # heartbeat seq -> the link's DATA count, bytes sent and the time, when it was sent
        self.data_sent_at = {}  # type: Dict[int, Tuple[int, int, float]]


class PathProber:
    """Runs each link's PathMtuSearch: one probe in flight per link, sent when the link
    answers heartbeats, the next as soon as one is answered or given up on.

    A probe is given up on after twice the link's heartbeat timeout.  One lost while
    the link's heartbeats are missing too says nothing of its size: the search waits
    for the link to come back.  Reports a link whose `limit` changed, for steering.
    """

    def __init__(self, reactor: Reactor, counters: Counters, client_id: int, data: ClientDataPath,
                 on_limit: Callable[[ClientLink], None]) -> None:
        self.reactor = reactor
        self.counters = counters
        self.client_id = client_id
        self.data = data  # read only: the epoch to seal with
        self.on_limit = on_limit
        self._probes = {}  # type: Dict[ClientLink, _Probe]

    def restart(self, link: ClientLink) -> None:
        """Search the link's path MTU from nothing (the link's first answer, a new address,
        data lost on it)."""
        probe = self._probe(link)
        link.pmtu.restart(link.mtu_ceiling(), ip_udp_headers(link.endpoint.family))
        self._next(link, probe)

    def on_link_up(self, link: ClientLink) -> None:
        """A link that answers: its first search starts."""
        if link not in self._probes:
            self.restart(link)

    def tick(self) -> None:
        """Every heartbeat interval: the searches that waited for an epoch, a socket or
        their link to answer again go on if they can."""
        for link, probe in list(self._probes.items()):
            if probe.waiting:
                self._next(link, probe)

    def on_ack(self, link: ClientLink, probe_id: int, size: int) -> None:
        probe = self._probes.get(link)
        if probe is None or probe_id != probe.id or size != probe.size or probe.timer is None:
            return  # late (given up on already), or not ours
        self.reactor.cancel(probe.timer)
        probe.timer = None
        link.pmtu.on_answered(size)
        self._next(link, probe)

    def forget(self, link: ClientLink) -> None:
        probe = self._probes.pop(link, None)
        if probe is not None:
            self.reactor.cancel(probe.timer)

    def close(self) -> None:
        for link in list(self._probes):
            self.forget(link)

    def _probe(self, link: ClientLink) -> "_Probe":
        probe = self._probes.get(link)
        if probe is None:
            probe = self._probes[link] = _Probe()
        self.reactor.cancel(probe.timer)
        probe.timer = None
        return probe

    def _next(self, link: ClientLink, probe: "_Probe") -> None:
        epoch = self.data.epoch
        probe.waiting = epoch is None or link.sock is None or not link.health.up
        if probe.waiting:
            return
        size = link.pmtu.next_size()
        if size is None:  # the search is over: larger sizes are tried again later
            probe.timer = self.reactor.call_later(PMTU_RAISE_S, self._raise, link)
            self.on_limit(link)
            return
        probe.id = probe.id % 0xFFFFFFFF + 1
        probe.size = size
        packet = bytearray(size)
        PROBE_PAYLOAD.pack_into(packet, HEADER_SIZE, probe.id)
        length = seal_into(packet, epoch.tx_mac, TYPE_PROBE, link.index, self.client_id, 0, epoch.next_nonce(),
                           size - OVERHEAD)
        exc = link.send(memoryview(packet)[:length], self.counters, unfragmented=True)
        if exc is not None and exc.errno == errno.EMSGSIZE:  # larger than the route's MTU: no need to try
            self._lost(link, probe, PMTU_PROBE_TRIES)
            return
        if exc is not None:
            link.on_send_error(exc)
        probe.timer = self.reactor.call_later(2 * link.health.timeout(), self._timed_out, link)

    def _timed_out(self, link: ClientLink) -> None:
        probe = self._probes[link]
        probe.timer = None
        if link.health.consecutive_fail or not link.health.up:
            probe.waiting = True  # the link itself is failing: not a verdict on the size
            return
        self._lost(link, probe, 1)

    def _lost(self, link: ClientLink, probe: "_Probe", tries: int) -> None:
        limit = link.pmtu.limit
        link.pmtu.on_lost(probe.size, tries)
        if link.pmtu.limit != limit:
            self.on_limit(link)
        self._next(link, probe)

    def _raise(self, link: ClientLink) -> None:
        probe = self._probes[link]
        probe.timer = None
        link.pmtu.raise_()
        self._next(link, probe)


class _Probe:
    """One link's probe in flight (PathProber's own)."""

    __slots__ = ("id", "size", "timer", "waiting")

    def __init__(self) -> None:
        self.id = 0
        self.size = 0
        self.timer = None  # type: Optional[Timer]  # its timeout, or the raise timer
        self.waiting = False  # for an epoch, a socket, or the link to answer heartbeats


class Steering:
    """The one place that decides where data goes: the active link (SwitchPolicy) and,
    with redundancy, the other links that carry copies; published as a Route."""

    def __init__(self, config: "ClientConfig", log: Log,
                 largest_datagram: Callable[[float], int] = lambda now: 0) -> None:
        self.log = log
        self.largest_datagram = largest_datagram  # the data path's: what the links must carry
        self.active = None  # type: Optional[ClientLink]
        self.last_switch_at = None  # type: Optional[float]
        self.configure(config)

    def configure(self, config: "ClientConfig") -> None:
        self.config = config
        self.policy = SwitchPolicy(config.switch_threshold, config.throughput_threshold_kbps,
                                   max(MIN_DWELL_FLOOR_S, MIN_DWELL_HEARTBEATS * config.heartbeat_interval_s))

    def candidates(self, links: Sequence[ClientLink], now: float) -> List[Candidate]:
        """Up: answering heartbeats, with a socket, carrying data (DataLiveness), and large
        enough for the datagrams lately (PathMtuSearch), unless no link that is up is."""
        cfg = self.config
        up = [link.health.up and link.sock is not None and link.liveness.fit(now) for link in links]
        large_enough = self.large_enough(links, now)
        if any(u and large for u, large in zip(up, large_enough)):
            up = [u and large for u, large in zip(up, large_enough)]
        return [Candidate(link_up, link.health.steady, link.health.score(cfg.loss_weight, cfg.rtt_weight,
                                                                          link.priority), link.meter.kbps())
                for link, link_up in zip(links, up)]

    def large_enough(self, links: Sequence[ClientLink], now: float) -> List[bool]:
        """Which links are not known to drop the largest datagrams sent lately."""
        largest = self.largest_datagram(now)
        return [link.pmtu.carries(largest) for link in links]

    def first_choice(self, links: Sequence[ClientLink], now: float) -> Route:
        self.active = links[self.policy.choose(self.candidates(links, now), None, None, now)[0]]
        self.log.info("first choice: %s carries the traffic" % self.active.name)
        return self.route(links, self.candidates(links, now))

    def forget(self, link: ClientLink) -> None:
        """A link removed by a reload: if it was active, the next evaluation chooses anew."""
        if link is self.active:
            self.active = None

    def evaluate(self, links: Sequence[ClientLink], now: float) -> Route:
        """Switch if the policy says so; the route that follows."""
        candidates = self.candidates(links, now)
        active = self.active.index if self.active is not None else None
        index, reason = self.policy.choose(candidates, active, self.last_switch_at, now)
        if reason:
            self._switch_to(links[index], reason, candidates, now)
        if self.active is not None and not self.active.pmtu.carries(self.largest_datagram(now)):
            self._say_too_large(links, now)
        return self.route(links, candidates)

    def _say_too_large(self, links: Sequence[ClientLink], now: float) -> None:
        """Data goes on a link known to drop datagrams of its size: no link that is up
        carries them.  Said in the log, never silently lost."""
        largest = self.largest_datagram(now)
        known = [(link.pmtu.limit - 1 - OVERHEAD, link) for link in links if link.pmtu.limit is not None]
        self.log.every("too-large", ERROR_LOG_INTERVAL_S * 6, "warn",
                       "%d-byte datagrams are larger than any link that is up carries (%s): they are sent and "
                       "lost; lower the application's MTU (WireGuard: the smallest of these, minus 32)" % (
                           largest, ", ".join("link %d at most %d" % (link.index, most) for most, link in known)))

    def _switch_to(self, link: ClientLink, reason: str, candidates: List[Candidate], now: float) -> None:
        old = self.active
        self.active = link
        link.switches += 1
        if old is not None and old.health.changed_at is None:
            # The start-up choice never answered: not a failover, and no dwell time
            # should keep the preferred link from taking over once it is steady.
            self.log.info("first link up: %s carries the traffic" % link.name)
            return
        self.last_switch_at = now
        if old is None:  # the active link was removed by a reload
            self.log.info("first choice: %s carries the traffic" % link.name)
        else:
            self.log.info("switch %s -> %s: %s (score %.1f -> %.1f)" % (
                old.name, link.name, reason, candidates[old.index].score, candidates[link.index].score))

    def copies_wanted(self) -> int:
        """How many links carry each packet now: `redundancy`, or for "auto" two while
        the active link has missed one of its last AUTO_REDUNDANCY_HEARTBEATS heartbeats."""
        wanted = self.config.redundancy
        if wanted == "auto":
            health = self.active.health if self.active is not None else None
            lossy = health is not None and (health.consecutive_fail > 0 or not health.up
                                            or health.recent_misses(AUTO_REDUNDANCY_HEARTBEATS) > 0)
            return 2 if lossy else 1
        return wanted

    def route(self, links: Sequence[ClientLink], candidates: List[Candidate]) -> Route:
        """The active link, then the best other up links while redundancy asks for more copies."""
        active = self.active
        if active is None or active.sock is None:
            return Route()
        aggregate = self.config.aggregate
        extra = len(links) if aggregate else self.copies_wanted() - 1
        others = []  # type: List[ClientLink]
        if extra > 0:
            # Aggregate: every other steady link that is up (a link that came back
            # gets a share only once steady); redundancy: the best that are up.
            others = [link for link in links if link is not active and candidates[link.index].up
                      and (link.health.steady or not aggregate)]
            others.sort(key=lambda link: candidates[link.index].score, reverse=True)
        carriers = (active,) + tuple(others[:extra])

        def largest_passing(among: Sequence[ClientLink]) -> int:
            return min([link.pmtu.limit - 1 - OVERHEAD for link in among if link.pmtu.limit is not None]
                       + [MAX_DATA_PAYLOAD])
        return Route(carriers, min(FITS_1500_IPV6, largest_passing(links)), largest_passing(carriers), aggregate)


class Client(ClientControl):
    """The client side: wires the data path, the handshake, the monitor and steering."""

    def __init__(self, config: "ClientConfig", reactor: Reactor, log: Log, resolver: Resolver) -> None:
        self.config = config
        self.reactor = reactor
        self.log = log
        self.resolver = resolver
        self.counters = Counters()
        self.static = StaticKeys(config.static_secret)
        self.links = [self._make_link(i, spec, config) for i, spec in enumerate(config.links)]
        self.data = ClientDataPath(config, reactor, log, self.counters, self)
        self.handshake = ClientHandshake(reactor, log, self.counters, self.static, config.client_id,
                                         lambda: self.links, self._on_new_epoch)
        self.monitor = LinkMonitor(reactor, self.counters, config.client_id, self.data,
                                   self._on_link_up, self._on_link_down, self._on_link_never_answered,
                                   self._on_data_lost, self._measure_rates)
        self.monitor.spread_fields = self._spread_fields
        self.prober = PathProber(reactor, self.counters, config.client_id, self.data, self._on_mtu_limit)
        self.steering = Steering(config, log, self.data.largest_datagram)
        self._apply_intervals(config)
        self._evaluation = None  # type: Optional[Periodic]
        self._sweep_timer = None  # type: Optional[Periodic]
        self._drop_summary = None  # type: Optional[Periodic]
        self._last_drop_report = None  # type: Optional[Dict[str, int]]
        self._last_score_file_at = None  # type: Optional[float]
        self.started_at = reactor.time()
        self.epoch_at = None  # type: Optional[float]  # when the running epoch was agreed
        self._reorder_timer = None  # type: Optional[Timer]

    # -- what the data path reads, for tests and status ------------------------

    @property
    def epoch(self) -> Optional[Epoch]:
        return self.data.epoch

    @property
    def active(self) -> Optional[ClientLink]:
        return self.steering.active

    @property
    def listen_sock(self) -> Optional[socket.socket]:
        return self.data.listen_sock

    @property
    def sessions_by_id(self) -> Dict[int, ClientSession]:
        return self.data.sessions_by_id

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.data.open()
        self.log.info("client %d listening on %s, %d link(s): %s" % (
            cfg.client_id, format_address(self.listen_sock.getsockname()), len(self.links),
            ", ".join(link.endpoint.text for link in self.links)))
        for link in self.links:
            if link.addr is not None:
                self._open_link_socket(link, at_start=True)
            elif link.spec.bound:
                self._probe_link_options(link)
            link.endpoint.start(self.reactor, self.resolver, self.log, cfg.dns_refresh_interval_s)
        self._publish(self.steering.first_choice(self.links, self.reactor.time()))
        self._evaluation = self.reactor.call_every(cfg.heartbeat_interval_s, self.evaluate)
        self._sweep_timer = self.reactor.call_every(self._sweep_interval(), self._sweep)
        self._drop_summary = self.reactor.call_every(DROP_SUMMARY_INTERVAL_S, self._log_drops)
        self.handshake.start()

    def close(self) -> None:
        for periodic in (self._evaluation, self._sweep_timer, self._drop_summary):
            if periodic is not None:
                periodic.cancel()
        self.handshake.close()
        self.monitor.close()
        self.prober.close()
        self.reactor.cancel(self._reorder_timer)
        for link in self.links:
            self._retire_link(link)
        self.data.close()

    def _sweep_interval(self) -> float:
        return min(SWEEP_INTERVAL_CEILING_S, self.config.session_timeout_s / 4)

    def _apply_intervals(self, config: "ClientConfig") -> None:
        self.handshake.retry_ceiling_s = config.heartbeat_interval_s
        self.monitor.interval_s = config.heartbeat_interval_s

    # -- what the data path reports (after its drain) --------------------------

    def on_handshake_packet(self, link: ClientLink, packet: bytes) -> None:
        self.handshake.on_packet(link, packet)

    def on_echo(self, link: ClientLink, seq: int, bitmap: int, server_rx: int, server_tx: int,
                largest_reply: int, up_queue_ms: int) -> None:
        self.data.largest_received.note(largest_reply)
        link.up_queue_s = up_queue_ms / 1000
        self.monitor.on_echo(link, seq, bitmap, server_rx, server_tx)

    def on_probe_ack(self, link: ClientLink, probe_id: int, size: int) -> None:
        self.prober.on_ack(link, probe_id, size)

    def on_large_datagram(self) -> None:
        self._steer()

    # -- aggregation -----------------------------------------------------------

    def on_reorder_waiting(self) -> None:
        """Early packets wait for the ones before them: a timer for the end of their hold."""
        self._reorder_timer = hold_timer(self.reactor, self.data.reorder, self._reorder_timer,
                                         self._reorder_hold_over)

    def _reorder_hold_over(self) -> None:
        self._reorder_timer = None
        self.data.expire_reorder()
        self.on_reorder_waiting()

    def _measure_rates(self, link: ClientLink, data_sent: int, tx_bytes: int, sent_at: float, server_rx: int,
                       server_tx: int, now: float) -> None:
        """An echo's counts against the last echo's: what the link carried each way over
        the interval, what it lost, and how much it queued (LinkRate)."""
        rtt = now - sent_at
        link.least_rtt.note(rtt, now)
        counts = (now, data_sent, tx_bytes, server_rx, server_tx, link.data_received, link.rx_bytes)
        last, link.counts_at_echo = link.counts_at_echo, counts
        if last is None or not self.config.aggregate:
            return
        interval = now - last[0]
        sent, sent_bytes = data_sent - last[1], tx_bytes - last[2]
        arrived, server_sent = (server_rx - last[3]) & COUNT_MASK, (server_tx - last[4]) & COUNT_MASK
        received, received_bytes = link.data_received - last[5], link.rx_bytes - last[6]
        if max(arrived, server_sent) >= 1 << 31:
            return  # a count went back: a new server
        least = link.least_rtt.value() or rtt
        lost_up = max(0.0, 1 - arrived / sent) if sent else 0.0
        lost_down = max(0.0, 1 - received / server_sent) if server_sent else 0.0
        link.rate_up.on_interval(sent_bytes, int(sent_bytes * (1 - lost_up)), lost_up, link.up_queue_s, interval)
        link.rate_down.on_interval(int(received_bytes / (1 - lost_down)) if lost_down < 1 else 0, received_bytes,
                                   lost_down, max(0.0, rtt - least - link.up_queue_s), interval)

    def _spread_fields(self, link: ClientLink) -> Tuple[int, int, int]:
        """What a carrying link's heartbeat tells the server: its rate down (kbit/s, at least
        1: 0 would mean "do not spread"), its one-way delay, the reorder hold (ms)."""
        rate_kbps = max(1, min(0xFFFFFFFF, int(link.rate_down.rate * 8 / 1000)))
        delay = min(0xFFFF, int(link.one_way_delay_s / OWD_UNIT_S))
        hold_ms = min(0xFFFF, int(math.ceil(self._reorder_hold_s() * 1000)))
        return rate_kbps, delay, hold_ms

    def _reorder_hold_s(self, carriers: Optional[Tuple[ClientLink, ...]] = None) -> float:
        """How long an early packet waits: the carriers' delay difference (their smoothed
        RTTs', queues included) and their jitter, within the floor and cap."""
        carriers = self.data.route.carriers if carriers is None else carriers
        srtts = [link.health.srtt for link in carriers if link.health.srtt is not None]
        if not srtts:
            return REORDER_HOLD_CAP_S
        # The whole RTT difference, not half: the queues that make it may all be one way.
        spread = max(srtts) - min(srtts) + 4 * max(link.health.rttvar or 0.0 for link in carriers)
        return min(REORDER_HOLD_CAP_S, max(REORDER_HOLD_FLOOR_S, spread))

    def on_challenge(self, link: ClientLink, token: int) -> None:
        """The server asks whether we receive at the address it saw this link's packets
        come from: answer from this link's socket (PROTOCOL.md, "Return path")."""
        epoch = self.data.epoch
        if epoch is None or link.sock is None or link not in self.links:
            return
        packet = seal(epoch.tx_mac, TYPE_RESPONSE, link.index, self.config.client_id, 0, epoch.next_nonce(),
                      PATH_TOKEN.pack(token))
        exc = link.send(memoryview(packet), self.counters)
        if exc is not None:
            link.on_send_error(exc)

    def on_send_error(self, link: ClientLink, exc: OSError) -> None:
        if link not in self.links:
            return  # removed by a reload since
        self.counters.add("link_errors")
        spec = link.spec
        if (spec.bind_interface or spec.bind_addr) and exc.errno in WAITING_ERRNOS and link.sock is not None:
            self._lose_link_socket(link, "%s (%s)" % (exc.strerror, spec.bind_interface or spec.bind_addr[0]))
            return
        if exc.errno in UNREACHABLE_ERRNOS and link.health.force_down(self.reactor.time()):
            self.log.warn("%s: %s; down until its heartbeats are answered again" % (link.name, exc))
            self._link_went_down()
            return
        self.log.every("link-error:%d" % link.index, ERROR_LOG_INTERVAL_S, "warn", "%s: %s" % (link.name, exc))

    # -- handshake and monitor events ------------------------------------------

    def _on_new_epoch(self, epoch: Epoch) -> None:
        self.data.epoch = epoch
        if self.data.reorder is not None:
            self.data.reorder.reset()  # the server numbers from 1 again
        self.epoch_at = self.reactor.time()
        for link in self.links:  # the first packet under the new keys makes the server switch
            self.monitor.beat_now(link)

    def _on_link_up(self, link: ClientLink) -> None:
        self.log.info("%s up, rtt %.1f ms" % (link.name, (link.health.srtt or 0) * 1000))
        self._steer()
        self.prober.on_link_up(link)

    def _on_mtu_limit(self, link: ClientLink) -> None:
        pmtu = link.pmtu
        if pmtu.limit is not None and not pmtu.searching:
            self.log.info("%s: path MTU %d (datagrams of %d bytes do not pass), so applications' datagrams up to "
                          "%d bytes" % (link.name, pmtu.confirmed + ip_udp_headers(link.endpoint.family),
                                        pmtu.limit, pmtu.confirmed - OVERHEAD))
        self._steer()

    def _on_link_never_answered(self, link: ClientLink) -> None:
        self.log.warn("%s: none of its %d heartbeats was ever answered; is %s the server's address (or its "
                      "frp server's) as seen from here?" % (link.name, NEVER_ANSWERED_HEARTBEATS, link.endpoint.text))

    def _on_data_lost(self, link: ClientLink) -> None:
        liveness = link.liveness
        self.log.warn("%s answers heartbeats but carries no data: none of the last %d data packets %s; "
                      "unfit for data for %.0fs (a path that drops DATA, or large datagrams)" % (
                          link.name, DATA_LOST_PACKETS,
                          "sent on it reached the server" if liveness.lost_way == "up" else "the server sent on it "
                          "arrived", liveness.unfit_until - self.reactor.time()))
        self._steer()
        self.prober.restart(link)  # has the path shrunk?

    def _on_link_down(self, link: ClientLink) -> None:
        self.log.info("%s down after %d missed heartbeats" % (link.name, link.health.consecutive_fail))
        self._link_went_down()

    def _link_went_down(self) -> None:
        """Traffic moves at once; with no link left up, a new handshake (perhaps the
        server restarted and forgot our epoch)."""
        self._steer()
        if not any(link.health.up for link in self.links):
            self._start_handshake()

    def _start_handshake(self) -> None:
        self.handshake.start(self.data.epoch.tag if self.data.epoch is not None else -1)

    # -- steering --------------------------------------------------------------

    def evaluate(self) -> None:
        """The regular evaluation, every heartbeat interval."""
        now = self.reactor.time()
        self._watch_link_sockets()
        for link in self.links:
            link.meter.sample(now, link.tx_bytes + link.rx_bytes)
        self._steer()
        self.prober.tick()
        if self.config.aggregate:
            carriers = self.data.route.carriers
            delays = [link.one_way_delay_s for link in carriers]
            rebalance([link.rate_up for link in carriers], delays)
            rebalance([link.rate_down for link in carriers], delays)
            self.data.refresh_spread()
        if self.config.aggregate and self.log.debug_enabled:
            self.log.debug("aggregate: " + "; ".join(
                "link %d up %.0f%% %.1f Mbit/s q %.1f ms loss %.1f%%, down %.0f%% %.1f Mbit/s q %.1f ms loss %.1f%%"
                % (link.index, link.rate_up.share * 100, link.rate_up.delivered_rate * 8e-6,
                   link.rate_up.queue_s * 1000, link.rate_up.lost_share * 100, link.rate_down.share * 100,
                   link.rate_down.delivered_rate * 8e-6, link.rate_down.queue_s * 1000,
                   link.rate_down.lost_share * 100)
                for link in self.data.route.carriers))
        if self.log.debug_enabled:
            for line in self.link_table():
                self.log.debug(line)
        self._maybe_write_score_file(now)

    def _steer(self) -> None:
        self._publish(self.steering.evaluate(self.links, self.reactor.time()))

    def _publish(self, route: Route) -> None:
        """The data path sends on `route` from its next drain.  A link that starts
        carrying is told to the server at once, by a heartbeat."""
        was = self.data.route.carriers
        reorder = self.data.reorder
        if reorder is not None:  # the links the server spreads replies over, and how long to wait
            reorder.carriers = tuple(link.index for link in route.carriers)
            reorder.hold_s = self._reorder_hold_s(route.carriers)
        if route.same_as(self.data.route):
            return
        self.data.route = route
        if (len(route.carriers) > 1 or len(was) > 1) and set(route.carriers) != set(was):
            self.log.info("sending on %s" % (" + ".join(link.name for link in route.carriers) or "no link"))
        if self.data.epoch is not None:
            was_active = was[0] if was else None
            for link in route.carriers:
                if link not in was or (link is route.carriers[0] and link is not was_active):
                    self.monitor.beat_now(link)

    # -- link sockets ----------------------------------------------------------

    def _open_link_socket(self, link: ClientLink, at_start: bool = False) -> bool:
        """Make the link's socket; False (logged) if its interface or address is not there
        yet.  An option that cannot work (no permission) stops a start, and leaves the
        link without a socket later (a reload, a new address)."""
        try:
            link.open_socket()
        except LinkSocketError as exc:
            why = "%s: %s" % (link.name, exc.strerror)
            if exc.waiting:
                if link.waiting != exc.strerror:
                    self.log.warn("%s; the link is down until that changes" % why)
                link.waiting = exc.strerror
                return False
            if at_start:
                raise OSError(why) from None
            self.log.every("link-socket:%d" % link.index, ERROR_LOG_INTERVAL_S, "error", why)
            return False
        if link.spec.bind_interface and not link.ifindex:  # it went away just now: try again later
            link.close_socket(self.reactor)
            link.waiting = "interface %s went away" % link.spec.bind_interface
            return False
        if link.waiting:
            self.log.info("%s: its socket is ready again (%s was the trouble)" % (link.name, link.waiting))
            link.waiting = ""
        self.data.watch(link)
        return True

    def _probe_link_options(self, link: ClientLink) -> None:
        """At start, for a link whose host name is not resolved yet: its socket options
        are tried on a throw-away socket, so a lacking permission stops the start now."""
        spec = link.spec
        try:
            open_link_socket(spec.bind_addr[1] if spec.bind_addr else socket.AF_INET, spec).close()
        except LinkSocketError as exc:
            if not exc.waiting:
                raise OSError("%s: %s" % (link.name, exc.strerror)) from None

    def _watch_link_sockets(self) -> None:
        """Every heartbeat interval: make the sockets of links that have none (an interface
        or address that was not there), and drop those whose interface was deleted or
        made again (a new index: the old socket sends nowhere)."""
        for link in self.links:
            if link.sock is None:
                if link.addr is not None and self._open_link_socket(link):
                    self._link_socket_ready(link)
            elif link.ifindex and interface_index(link.spec.bind_interface) != link.ifindex:
                self._lose_link_socket(link, "interface %s went away" % link.spec.bind_interface)

    def _link_socket_ready(self, link: ClientLink) -> None:
        if self.data.epoch is None:
            self.handshake.send_on(link)
        else:
            self.monitor.beat_now(link)

    def _lose_link_socket(self, link: ClientLink, why: str) -> None:
        """The link cannot send any more (its interface or address is gone): down at once,
        and its socket is made again when that comes back."""
        link.close_socket(self.reactor)
        link.waiting = why
        self.log.warn("%s: %s; the link is down until it is back" % (link.name, why))
        if link.health.force_down(self.reactor.time()):
            self._link_went_down()
        else:
            self._steer()

    def _on_address_change(self, endpoint: Endpoint) -> None:
        link = next((each for each in self.links if each.endpoint is endpoint), None)
        if link is None:
            return  # a look-up that finished after a reload removed its link
        if link.sock is None or link.sock.family != endpoint.family:
            link.close_socket(self.reactor)
            if not self._open_link_socket(link):
                self._steer()  # no socket: not a carrier, nor a candidate
                return
        if self.data.epoch is None:
            self.handshake.send_on(link)
        else:
            self.monitor.beat_now(link)
        if link.health.up:
            self.prober.restart(link)  # another address, perhaps another path

    def _make_link(self, index: int, spec: "LinkConfig", config: "ClientConfig") -> ClientLink:
        link = ClientLink(index, spec, self._on_address_change, config.max_consecutive_fail,
                          recovery_hold_s(config))
        # Made once, so the data path passes it without building a closure per drain;
        # it only queues the error, for after the drain.
        link.on_send_error = lambda exc: self.reactor.call_soon(self.on_send_error, link, exc)
        return link

    def _new_link(self, index: int, spec: "LinkConfig") -> ClientLink:
        link = self._make_link(index, spec, self.config)
        if link.addr is not None:
            self._open_link_socket(link)
        link.endpoint.start(self.reactor, self.resolver, self.log, self.config.dns_refresh_interval_s)
        if self.data.epoch is not None:
            self.monitor.beat_now(link)
        return link

    def _retire_link(self, link: ClientLink) -> None:
        link.endpoint.close()
        self.monitor.forget(link)
        self.prober.forget(link)
        self.steering.forget(link)
        link.close_socket(self.reactor)

    # -- housekeeping ----------------------------------------------------------

    def _sweep(self) -> None:
        self.data.expire_sessions(self.reactor.time())
        if self.data.epoch is not None and self.data.epoch.tx_seq > SEQ_REKEY_AT:
            self._start_handshake()

    def _log_drops(self) -> None:
        self._last_drop_report = log_counter_summary(self.log, "client", self.counters, self._last_drop_report)

    def status(self) -> Dict[str, Any]:
        """The state a person or a script wants to see (no keys in it)."""
        cfg = self.config
        now = self.reactor.time()
        carriers = self.data.route.carriers
        largest = self.data.largest_datagram(now)
        links = []
        for link, cand in zip(self.links, self.steering.candidates(self.links, now)):
            health, pmtu = link.health, link.pmtu
            links.append({
                "index": link.index,
                "address": link.endpoint.text,
                "resolved": format_address(link.addr),
                "state": "up" if cand.up else "down",
                "steady": health.steady,
                "srtt_ms": round(health.srtt * 1000, 3) if health.srtt is not None else None,
                "rttvar_ms": round(health.rttvar * 1000, 3) if health.srtt is not None else None,
                "jitter_ms": round(health.jitter * 1000, 3),
                "loss": round(health.loss(), 4),
                "loss_up": _round_or_none(health.loss_up()),
                "loss_down": _round_or_none(health.loss_down()),
                "score": round(cand.score, 2),
                "kbps": round(cand.kbps, 1),
                "priority": link.priority,
                "active": link is self.active,
                "carrier": link in carriers,
                "switches": link.switches,
                "last_answer_age_s": None if health.last_answer_at is None else round(now - health.last_answer_at, 1),
                "data": ("unfit %s, tried again in %.0fs" % (link.liveness.lost_way, link.liveness.unfit_until - now)
                         if not link.liveness.fit(now) else "ok" if pmtu.carries(largest)
                         else "too small for %d-byte datagrams" % largest),
                # The largest datagram answered both ways, as an IP MTU and as the largest
                # application datagram: what the search has proved so far.
                "path_mtu": pmtu.confirmed + ip_udp_headers(link.endpoint.family) if pmtu.confirmed else None,
                "max_payload": pmtu.confirmed - OVERHEAD if pmtu.confirmed else None,
                "mtu_search": "searching" if pmtu.searching else "done",
                "tx_packets": link.tx_packets, "tx_bytes": link.tx_bytes,
                "rx_packets": link.rx_packets, "rx_bytes": link.rx_bytes,
            })
            if cfg.aggregate:  # what each link carries of the traffic, and what it is estimated to carry
                links[-1].update(self._aggregate_status(link))
            if link.spec.bound:
                links[-1]["via"] = describe_link_binding(link.spec)
            if link.waiting:
                links[-1]["waiting"] = link.waiting
        last_switch_at = self.steering.last_switch_at
        return {
            "mode": "client",
            "pid": os.getpid(),
            "client_id": cfg.client_id,
            "last_switch_ago_s": None if last_switch_at is None else round(now - last_switch_at, 1),
            "epoch": "%04x" % self.epoch.tag if self.epoch else None,
            "uptime_s": round(now - self.started_at, 1),
            "handshake_age_s": None if self.epoch_at is None else round(now - self.epoch_at, 1),
            "sessions": len(self.data.sessions_by_id),
            "copies": len(carriers),
            "carriers": [link.index for link in carriers],
            "reorder": reorder_status(self.data.reorder),
            "links": links,
            "counters": dict(self.counters),
        }

    def _aggregate_status(self, link: ClientLink) -> Dict[str, Any]:
        sent = sum(each.rate_up.sent_rate for each in self.links)
        received = sum(each.rate_down.delivered_rate for each in self.links)
        return {
            "share_up": round(link.rate_up.sent_rate / sent, 3) if sent else 0.0,
            "share_down": round(link.rate_down.delivered_rate / received, 3) if received else 0.0,
            "rate_up_kbps": round(link.rate_up.rate * 8 / 1000, 1),
            "rate_down_kbps": round(link.rate_down.rate * 8 / 1000, 1),
        }

    def link_table(self) -> List[str]:
        """The links as aligned text lines, for the debug log and the demo."""
        return link_table_lines(self.status()["links"])

    def status_lines(self) -> List[str]:
        """The status as text: the link table and a summary line (SIGUSR1, --status)."""
        return client_status_lines(self.status())

    def reconfigure(self, new: "ClientConfig") -> None:
        """Apply a reloaded config (keys and listen address unchanged): links, weights, intervals.

        Links are matched by remote_addr and socket options (bind_interface,
        bind_addr, fwmark), so a kept link keeps its socket, its measurements and,
        if it was active, the traffic; sessions are untouched.
        """
        kept, retired = self._links_kept_by(new)
        refresh_changed = new.dns_refresh_interval_s != self.config.dns_refresh_interval_s
        self.config = self.data.config = new
        links = []
        for index, (spec, link) in enumerate(zip(new.links, kept)):
            if link is None:
                link = self._new_link(index, spec)
                self.log.info("reload: %s added%s" % (link.name, _via(spec)))
            elif refresh_changed:
                link.endpoint.close()
                link.endpoint.start(self.reactor, self.resolver, self.log, new.dns_refresh_interval_s)
            link.index, link.spec = index, spec
            link.health.max_consecutive_fail = new.max_consecutive_fail
            link.health.recovery_hold_s = recovery_hold_s(new)
            links.append(link)
        for link in retired:
            self.log.info("reload: %s removed%s" % (link.name, _via(link.spec)))
            self._retire_link(link)
        self.links = links
        self.steering.configure(new)
        self._apply_intervals(new)
        self._evaluation.interval = new.heartbeat_interval_s
        self._sweep_timer.interval = self._sweep_interval()
        self._steer()

    def _links_kept_by(self, new: "ClientConfig") -> Tuple[List[Optional[ClientLink]], List[ClientLink]]:
        """For each of the new config's links the running link it keeps (same remote
        and socket options) or None; and the running links that none keeps.  Several
        links may go the same way (two sockets, two NAT mappings to one address):
        those are matched in their order."""
        running = {}  # type: Dict[tuple, List[ClientLink]]
        for link in self.links:
            running.setdefault((link.endpoint.text, link.spec.socket_options), []).append(link)
        kept = []  # type: List[Optional[ClientLink]]
        for spec in new.links:
            same_way = running.get((spec.remote_addr, spec.socket_options))
            kept.append(same_way.pop(0) if same_way else None)
        return kept, [link for same_way in running.values() for link in same_way]

    def _maybe_write_score_file(self, now: float) -> None:
        cfg = self.config
        if not (cfg.score_file or cfg.metrics_file):
            return
        if self._last_score_file_at is not None and now - self._last_score_file_at < SCORE_FILE_MIN_INTERVAL_S:
            return
        self._last_score_file_at = now
        write_status_files(self.log, cfg.score_file, self.status, cfg.metrics_file, self.metrics)

    def metrics(self) -> "List[Metric]":
        """The status as Prometheus metrics (prometheus_text)."""
        now = self.reactor.time()
        carriers = self.data.route.carriers

        def age(at: Optional[float]) -> float:
            return now - at if at is not None else float("inf")

        per_link = [
            ("mpudp_link_up", "gauge", "1 if the link answers heartbeats and has a socket.",
             lambda link: link.health.up and link.sock is not None),
            ("mpudp_link_active", "gauge", "1 for the link chosen to carry the traffic.",
             lambda link: link is self.active),
            ("mpudp_link_carrier", "gauge", "1 for each link data goes out on now (redundancy: several).",
             lambda link: link in carriers),
            ("mpudp_link_rtt_seconds", "gauge", "Smoothed heartbeat round-trip time (NaN before the first).",
             lambda link: link.health.srtt if link.health.srtt is not None else float("nan")),
            ("mpudp_link_loss_ratio", "gauge", "Share of recent heartbeats not answered.",
             lambda link: link.health.loss()),
            ("mpudp_link_last_answer_age_seconds", "gauge", "Seconds since the link last answered (+Inf: never).",
             lambda link: age(link.health.last_answer_at)),
            ("mpudp_link_sent_packets_total", "counter", "Packets sent on the link (data and heartbeats).",
             lambda link: link.tx_packets),
            ("mpudp_link_sent_bytes_total", "counter", "Bytes sent on the link.", lambda link: link.tx_bytes),
            ("mpudp_link_received_packets_total", "counter", "Authenticated packets received on the link.",
             lambda link: link.rx_packets),
            ("mpudp_link_received_bytes_total", "counter", "Authenticated bytes received on the link.",
             lambda link: link.rx_bytes),
            ("mpudp_link_switches_total", "counter", "Times the link became the active one.",
             lambda link: link.switches),
            ("mpudp_link_path_mtu_bytes", "gauge", "Largest IP packet answered both ways (NaN before the first).",
             lambda link: (link.pmtu.confirmed + ip_udp_headers(link.endpoint.family) if link.pmtu.confirmed
                           else float("nan"))),
        ]  # type: List[Tuple[str, str, str, Callable[[ClientLink], float]]]
        if self.config.aggregate:
            per_link += [
                ("mpudp_link_rate_up_bytes_per_second", "gauge", "What the link is estimated to carry to the server "
                 "(aggregate).", lambda link: link.rate_up.rate),
                ("mpudp_link_rate_down_bytes_per_second", "gauge", "What the link is estimated to carry from the "
                 "server (aggregate).", lambda link: link.rate_down.rate),
            ]
        metrics = [
            ("mpudp_uptime_seconds", "gauge", "Seconds since the client started.", [({}, now - self.started_at)]),
            ("mpudp_handshake_age_seconds", "gauge", "Seconds since the running epoch was agreed (+Inf: none).",
             [({}, age(self.epoch_at))]),
            ("mpudp_sessions", "gauge", "Local applications with a session.", [({}, len(self.sessions_by_id))]),
        ]  # type: List[Metric]
        for name, kind, help_text, read in per_link:
            metrics.append((name, kind, help_text, [({"link": link.index, "remote": link.endpoint.text},
                                                     float(read(link)))
                                                    for link in self.links]))
        return metrics + [drop_metrics(self.counters)]


def hold_timer(reactor: Reactor, reorder: Optional[ReorderBuffer], timer: Optional[Timer], callback: Callable,
               *args) -> Optional[Timer]:
    """The timer for the end of the oldest early packet's hold (client and server alike):
    `timer` if it fires by then, else a new one for callback(*args)."""
    deadline = reorder.deadline() if reorder is not None else None
    if deadline is None or (timer is not None and timer.when <= deadline):
        return timer
    reactor.cancel(timer)
    return reactor.call_at(deadline, callback, *args)


def reorder_status(reorder: Optional[ReorderBuffer]) -> Optional[Dict[str, Any]]:
    """With aggregate: how the packets that came out of order were put back."""
    if reorder is None:
        return None
    return {"hold_ms": round(reorder.hold_s * 1000, 1), "waiting": len(reorder.held),
            "late": reorder.released_late, "given_up": reorder.skipped}


def _round_or_none(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else "%.0f" % (value * 100)


def describe_link_binding(spec: "LinkConfig") -> str:
    """How a link's socket leaves this host: "dev wwan0 mark 0x10 from 10.0.0.2" (as `ip route` says)."""
    parts = []
    if spec.bind_interface:
        parts.append("dev %s" % spec.bind_interface)
    if spec.fwmark:
        parts.append("mark 0x%x" % spec.fwmark)
    if spec.bind_addr:
        parts.append("from %s" % spec.bind_addr[0])
    return " ".join(parts)


def _via(spec: "LinkConfig") -> str:
    """": dev wwan0 from 10.0.0.2" after a bound link's name in a log line, else nothing."""
    return ": " + describe_link_binding(spec) if spec.bound else ""


def link_table_lines(links: Sequence[Dict[str, Any]]) -> List[str]:
    """The client's links (as in status()["links"]) as an aligned table; * marks the active
    one, + the others that carry copies (redundancy)."""
    aggregate = any("share_up" in link for link in links)
    rows = [("", "link", "address", "state", "srtt ms", "loss%", "up/down", "score", "kbps", "mtu", "switches")
            + (("share up/down", "est. Mbit/s up/down") if aggregate else ())]
    for link in links:
        rows.append((
            "*" if link["active"] else "+" if link.get("carrier") else "",
            str(link["index"]),
            link["address"] + (" " + link["via"] if link.get("via") else ""),
            ("wait" if link.get("waiting") else link["state"])
            + ("" if link["steady"] or link["state"] == "down" else "?"),
            "-" if link["srtt_ms"] is None else "%.2f" % link["srtt_ms"],
            _percent(link["loss"]),
            "%s/%s" % (_percent(link["loss_up"]), _percent(link["loss_down"])),
            "%.1f" % link["score"],
            "%.1f" % link["kbps"],
            "-" if link.get("path_mtu") is None else "%d%s" % (link["path_mtu"],
                                                                "?" if link["mtu_search"] == "searching" else ""),
            str(link["switches"]),
        ) + (("%.0f%%/%.0f%%" % (link["share_up"] * 100, link["share_down"] * 100),
              "%.1f/%.1f" % (link["rate_up_kbps"] / 1000, link["rate_down_kbps"] / 1000)) if aggregate else ()))
    return format_table(rows)


def client_status_lines(status: Dict[str, Any]) -> List[str]:
    ago = status.get("last_switch_ago_s")
    return link_table_lines(status["links"]) + ["sessions: %d; epoch %s; last switch %s" % (
        status["sessions"], status["epoch"] or "-", "never" if ago is None else "%.0fs ago" % ago)]


def server_status_lines(status: Dict[str, Any]) -> List[str]:
    rows = [("client", "epoch", "return path", "upstream", "sessions")]
    for c in status["clients"]:
        path = "-" if c["return_link"] is None else " + ".join(
            "link %d %s" % (link, addr)
            for link, addr in c.get("return_links") or [(c["return_link"], c["return_addr"])])
        rows.append((str(c["client_id"]), c["epoch"] or "-", path, c["upstream"], str(c["sessions"])))
    return format_table(rows)


def format_table(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def write_json_atomically(path: str, data: Any) -> None:
    """The status as JSON, atomically (write_file_atomically)."""
    write_file_atomically(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_file_atomically(path: str, text: str) -> None:
    """Write then rename, so a reader never sees half a file.  The temporary file is made
    new (O_EXCL) and never through a symbolic link: in a directory others can write to,
    a planted link must not make us overwrite its target."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileExistsError:  # left by a crash of an earlier process with our pid; a link is unlinked, not followed
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# Metrics in the Prometheus text exposition format, for node_exporter's textfile
# collector: names start with mpudp_, links and clients are labels, counters
# (_total) only ever grow within a process's life.  A metric is
# (name, type, help, [(labels, value)]).
Metric = Tuple[str, str, str, List[Tuple[Dict[str, Any], float]]]


def prometheus_text(metrics: Sequence[Metric]) -> str:
    lines = []
    for name, kind, help_text, samples in metrics:
        lines.append("# HELP %s %s" % (name, help_text))
        lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            label_text = ",".join('%s="%s"' % (k, _label_value(v)) for k, v in sorted(labels.items()))
            lines.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "", _sample_value(value)))
    return "\n".join(lines) + "\n"


def _label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 1 << 53 else repr(float(value))


def drop_metrics(counters: Counters) -> Metric:
    return ("mpudp_drops_total", "counter", "Packets dropped and errors, by reason (the drop summary's names).",
            [({"reason": reason}, count) for reason, count in sorted(counters.items())])


def write_status_files(log: Log, status_path: str, status: Callable[[], Dict[str, Any]], metrics_path: str,
                       metrics: Callable[[], Sequence[Metric]]) -> None:
    """The status JSON and the metrics file, each if configured; a failure is logged at a bounded rate."""
    for key, path, render in (("status", status_path, lambda: json.dumps(dict(status(), time=time.time()),
                                                                          indent=1, sort_keys=True) + "\n"),
                              ("metrics", metrics_path, lambda: prometheus_text(metrics()))):
        if not path:
            continue
        try:
            write_file_atomically(path, render())
        except OSError as exc:
            log.every("file:" + key, ERROR_LOG_INTERVAL_S, "warn", "cannot write %s %s: %s" % (
                key, path, exc.strerror or exc))


def log_counter_summary(log: Log, who: str, counters: Counters, last: Optional[Dict[str, int]]) -> Dict[str, int]:
    """One line with what changed since the last summary; nothing when nothing did."""
    now = dict(counters)
    changes = {k: v - (last or {}).get(k, 0) for k, v in now.items() if v != (last or {}).get(k, 0)}
    if changes:
        log.info("%s drops and errors in the last %ds: %s" % (
            who, DROP_SUMMARY_INTERVAL_S, " ".join("%s=%d" % kv for kv in sorted(changes.items()))))
    return now


# ============================================================================
# Server
# ============================================================================
#
# The handshake, and why replays cannot use it.  A client starts an epoch by
# sending HELLO(client nonce, cookie) under its static key.  Without a fresh
# cookie the server answers COOKIE(client nonce, cookie) and keeps nothing;
# with one it answers WELCOME(client nonce, fresh random server nonce), the
# same size, and keeps the new epoch as *pending* (at most
# PENDING_EPOCHS_PER_CLIENT per client).  The first packet that verifies under
# a pending epoch's keys makes it the client's epoch.  A replayed HELLO
# carries an old cookie, or one made for another address, and the attacker
# cannot put a new one in (the MAC covers it): it gets a COOKIE and leaves no
# state.  A replayed WELCOME does not match the client's nonce.  After either
# side restarts, the old epoch's keys are gone, so old packets no longer
# verify at all.
#
# The server is split as the client is: ServerDataPath carries the packets
# (link -> upstream in on_listen_readable, upstream -> link in
# on_upstream_readable) and only reads each Peer's epochs and ReturnPath;
# ServerHandshake answers HELLOs; Server wires them, and handles what the data
# path reports after each drain (a HELLO, a heartbeat, a confirmed epoch, a
# moved return path).


class Unvalidated:
    """An address a client's ACTIVE packets came from that has not answered a challenge."""

    __slots__ = ("token", "budget", "link", "seq", "copies_bits")

    def __init__(self, token: int) -> None:
        self.token = token
        self.budget = 0  # bytes the server may still send it: 3 x what came from it, less what went
        self.link = self.seq = self.copies_bits = 0  # its newest ACTIVE packet's


# ReturnPath.observe's verdicts.
PATH_SAME, PATH_MOVED, PATH_CHALLENGE = 0, 1, 2


class ReturnPath:
    """Where a client's replies go (PROTOCOL.md, "Return path"): the link and address of
    its newest ACTIVE packet and, with redundancy, the links of the next newest, COPIES
    + 1 in all.  It is shown fresh, authenticated packets only, and an ACTIVE packet
    older than the newest never moves the path back.

    An address moves the path only once it has answered a challenge (QUIC's path
    validation, RFC 9000 section 8.2): an on-path party that races a copy of a packet
    from another address must not turn the replies onto it.  Until then that
    address gets replies as well as the validated path, but at most 3x the bytes
    that came from it (RFC 9000 section 8.1), so a NAT that rebinds loses nothing
    for the round trip the challenge takes, and a racer gets little."""

    __slots__ = ("addr", "link", "seq", "copies_bits", "addrs", "links", "unvalidated", "_validated",
                 "_carriers", "_validated_addrs")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """No path: the client fell silent."""
        self.addr = None  # type: Optional[tuple]  # the newest validated ACTIVE packet's source address
        self.link = 0  # its link
        self.seq = 0  # its sequence number
        self.copies_bits = 0  # its COPIES field
        self.addrs = []  # type: List[tuple]  # every reply goes to each of these
        self.links = ()  # type: Tuple[Tuple[int, tuple], ...]  # (link, address) of the validated ones, sorted
        self.unvalidated = {}  # type: Dict[tuple, Unvalidated]  # oldest first
        self._validated = {}  # type: Dict[tuple, bool]  # addresses that answered a challenge, oldest first
        self._carriers = {}  # type: Dict[int, Tuple[tuple, int]]  # link -> (address, newest ACTIVE seq)
        self._validated_addrs = []  # type: List[tuple]

    def new_epoch(self) -> None:
        """Sequence numbers start again; the addresses stay until newer packets move them."""
        self.seq = 0
        self._carriers = {link: (addr, 0) for link, (addr, _seq) in self._carriers.items()}
        for candidate in self.unvalidated.values():
            candidate.seq = 0

    def observe(self, link: int, addr: tuple, seq: int, copies_bits: int, size: int) -> int:
        """An ACTIVE packet of `size` bytes came in: PATH_MOVED if the (link, address) pairs
        replies go to changed, PATH_CHALLENGE if its address must prove it receives first."""
        if addr not in self._validated:
            return self._unvalidated(link, addr, seq, copies_bits, size)
        if seq > self.seq:
            changed = False
            if addr != self.addr or link != self.link or copies_bits != self.copies_bits:
                changed = self._move(link, addr, seq, copies_bits)
            self.seq = seq
            return PATH_MOVED if changed else PATH_SAME
        if self.copies_bits and link != self.link and self._note_carrier(link, addr, seq):
            return PATH_MOVED
        return PATH_SAME

    def validate(self, addr: tuple, token: int) -> bool:
        """A RESPONSE came from `addr`: if it carries that address's token, the address is
        validated and its newest ACTIVE packet applies now.  True if the path moved."""
        candidate = self.unvalidated.get(addr)
        if candidate is None or candidate.token != token:
            return False
        del self.unvalidated[addr]
        self._validated[addr] = True
        while len(self._validated) > MAX_VALIDATED_PATHS:
            del self._validated[next(iter(self._validated))]
        moved = self.observe(candidate.link, addr, candidate.seq, candidate.copies_bits, 0) == PATH_MOVED
        self._retarget()
        return moved

    def spent(self, bytes_each: int) -> None:
        """The data path sent `bytes_each` to every address in `addrs`: unvalidated ones pay."""
        exhausted = False
        for addr in self.addrs:
            candidate = self.unvalidated.get(addr)
            if candidate is not None:
                candidate.budget -= bytes_each
                exhausted = exhausted or candidate.budget <= 0
        if exhausted:
            self._retarget()

    def _unvalidated(self, link: int, addr: tuple, seq: int, copies_bits: int, size: int) -> int:
        candidate = self.unvalidated.get(addr)
        if candidate is None:
            while len(self.unvalidated) >= MAX_UNVALIDATED_PATHS:
                del self.unvalidated[next(iter(self.unvalidated))]
            candidate = self.unvalidated[addr] = Unvalidated(int.from_bytes(os.urandom(8), "big"))
        had_budget = candidate.budget > 0
        candidate.budget += UNVALIDATED_BYTES_FACTOR * size
        if seq > candidate.seq:
            candidate.link, candidate.seq, candidate.copies_bits = link, seq, copies_bits
        if not had_budget:
            self._retarget()
        return PATH_CHALLENGE

    def _move(self, link: int, addr: tuple, seq: int, copies_bits: int) -> bool:
        paths = self._carriers
        if self.addr is not None:
            paths[self.link] = (self.addr, self.seq)
        paths[link] = (addr, seq)
        self.addr, self.link = addr, link
        if copies_bits == self.copies_bits and (link, addr) in self.links:
            return False  # with redundancy the link of the newest copy alternates: the same links
        self.copies_bits = copies_bits
        return self._rank()

    def _note_carrier(self, link: int, addr: tuple, seq: int) -> bool:
        """An older ACTIVE packet from another link: with redundancy a slower link's packets
        always come second, and it carries all the same."""
        known = self._carriers.get(link)
        if known is not None and known[1] >= seq:
            return False  # late even for its own link: it never moves that link's address back
        self._carriers[link] = (addr, seq)
        return (link, addr) not in self.links and self._rank()

    def _rank(self) -> bool:
        paths, link = self._carriers, self.link
        copies = (self.copies_bits >> COPIES_SHIFT) + 1
        newest_first = sorted((other for other in paths if other != link), key=lambda other: paths[other][1],
                              reverse=True)
        others = newest_first[:copies - 1]
        self._validated_addrs = [self.addr] + [paths[other][0] for other in others]
        self._retarget()
        links = tuple(sorted([(link, self.addr)] + [(other, paths[other][0]) for other in others]))
        if links == self.links:
            return False
        self.links = links
        return True

    def _retarget(self) -> None:
        """addrs: the validated path, and each unvalidated address newer than it with budget left."""
        self.addrs = self._validated_addrs + [addr for addr, candidate in self.unvalidated.items()
                                              if candidate.budget > 0 and candidate.seq > self.seq
                                              and addr not in self._validated_addrs]

    def describe(self) -> str:
        """"link 0 (192.0.2.1:7)", "links 0 (…) + 1 (…)", for log lines."""
        return "link%s %s" % ("s" if len(self.links) > 1 else "",
                              " + ".join("%d (%s)" % (link, format_address(addr)) for link, addr in self.links))


class ServerSession:
    """One (client, session id): the upstream socket that stands for one local application."""

    __slots__ = ("id", "peer", "sock", "packets", "seen_packets", "last_active")

    def __init__(self, session_id: int, peer: "Peer", sock: socket.socket, now: float) -> None:
        self.id = session_id
        self.peer = peer
        self.sock = sock  # connected to the upstream
        self.packets = 0
        self.seen_packets = 0
        self.last_active = now


class PeerLink:
    """What the server knows of one of a client's links: its heartbeats (the last seq and
    a bitmap of the 32 before, for the echoes) and its DATA counts, both ways, which
    the echoes carry back (DataLiveness), beside the client's own from its heartbeats."""

    __slots__ = ("hb_last", "hb_bitmap", "data_received", "data_sent", "client_sent", "client_received",
                 "rate", "delay_s", "clock_base", "least_one_way")

    def __init__(self) -> None:
        self.hb_last = self.hb_bitmap = 0
        self.data_received = self.data_sent = 0
        self.client_sent = self.client_received = 0
        self.rate = AGG_INITIAL_RATE  # bytes/s to the client on this link, as its heartbeats say (aggregate)
        self.delay_s = 0.0
        self.clock_base = None  # type: Optional[int]  # the first heartbeat's (our clock - its clock), ms
        self.least_one_way = RecentMin(MIN_RTT_MEMORY_S)  # the least heartbeat one-way time, from clock_base

    def up_queue_ms(self, client_ms: int, now: float) -> int:
        """How much longer than its least lately this heartbeat took to come (ms): the
        queue towards us.  The clocks' offset cancels out; counts wrap at 2^32 ms."""
        offset = (int(now * 1000) - client_ms) & COUNT_MASK
        if self.clock_base is None:
            self.clock_base = offset
        relative = ((offset - self.clock_base + (1 << 31)) & COUNT_MASK) - (1 << 31)
        self.least_one_way.note(relative, now)
        return max(0, min(0xFFFF, relative - int(self.least_one_way.value() or 0)))


class Peer:
    """One client as the server knows it: keys, epochs, return path, sessions."""

    def __init__(self, client_id: int, secret: bytes, upstream: Endpoint) -> None:
        self.client_id = client_id
        self.static = StaticKeys(secret)
        self.upstream = upstream  # where new sessions go
        self.epoch = None  # type: Optional[Epoch]
        self.pending = {}  # type: Dict[int, Epoch]  # tag -> epoch, oldest first
        self.return_path = ReturnPath()
        self.links = {}  # type: Dict[int, PeerLink]  # by the link field of its packets
        self.sessions = {}  # type: Dict[int, ServerSession]
        self.packets = 0  # authenticated packets received (and rx_bytes their bytes)
        self.rx_bytes = 0
        self.tx_packets = self.tx_bytes = 0  # replies sent, copies counted
        self.largest_reply = RecentMax(LARGE_DATA_MEMORY_S)  # the echoes tell the client (its links' path MTU)
        # Aggregate, while the client's heartbeats ask for it: replies spread over its
        # carrying links, and its packets put back in order before the upstream.
        self.spreader = None  # type: Optional[Spreader]
        self._spread = ([], {})  # type: Tuple[List[Tuple[Tuple[int, tuple], float, float]], Dict[int, PeerLink]]
        self._spread_made_for = None  # type: Optional[Tuple[Tuple[int, tuple], ...]]  # spread_links'
        self.reorder = None  # type: Optional[ReorderBuffer]
        self.reorder_timer = None  # type: Optional[Timer]
        self.seen_packets = 0
        self.last_heard = None  # type: Optional[float]  # at a sweep: packets came since the one before
        self.epoch_at = None  # type: Optional[float]  # when the running epoch was confirmed
        self.hello_budget = HELLOS_PER_SWEEP
        self.seen_hellos = {}  # type: Dict[bytes, bool]  # client nonces answered, oldest first
        self.path_moves = 0  # return path moves since the last line about it (rate-limited)
        self.path_line_timer = None  # type: Optional[Timer]  # that line, when it is held back
        self.path_announced = False  # "return path …" was logged; later moves say "replies now go by …"
        self.on_upstream_error = None  # type: Optional[Callable[[OSError], None]]  # the data path's, made once

    def link(self, index: int) -> PeerLink:
        found = self.links.get(index)
        if found is None:
            found = self.links[index] = PeerLink()  # at most 256: the field is a byte
        return found

    def confirm(self, epoch: Epoch) -> None:
        """A packet verified under a pending epoch: it is the client's epoch from now on.
        Done by the data path itself, as wireguard-go's receive path confirms a keypair:
        the packets after it in the same drain must be judged under the new epoch."""
        self.epoch = epoch
        self.pending.clear()
        self.return_path.new_epoch()  # heartbeat bitmaps stay: a new epoch does not restart the link's count
        if self.reorder is not None:
            self.reorder.reset()  # this packet is the new epoch's first taken in

    def spread_links(self) -> Tuple[List[Tuple[Tuple[int, tuple], float, float]], Dict[int, PeerLink]]:
        """((link, address), rate, delay) of each validated carrying link, for the Spreader,
        and their PeerLinks by index.  Made again when the return path moves (a new
        `links`) or a heartbeat brought new estimates (`estimates_changed`), not per drain."""
        links = self.return_path.links
        if self._spread_made_for is not links:
            states = {link: self.link(link) for link, _addr in links}
            self._spread = ([((link, addr), states[link].rate, states[link].delay_s) for link, addr in links], states)
            self._spread_made_for = links
        return self._spread

    def estimates_changed(self) -> None:
        """A heartbeat brought a link's rate or delay: spread_links makes its view again."""
        self._spread_made_for = None


class ServerControl:
    """What the server's data path reports to; each call comes after the drain that saw it."""

    def on_hello(self, peer: Peer, link: int, addr: tuple, packet: bytes) -> None: ...
    def on_heartbeat(self, peer: Peer, epoch: Epoch, link: int, addr: tuple, hb_seq: int, client_sent: int,
                     client_received: int, spread: Tuple[int, int, int, int], active: bool) -> None: ...
    def on_epoch_confirmed(self, peer: Peer, epoch: Epoch) -> None: ...  # to log it
    def on_return_path(self, peer: Peer, epoch: Epoch, link: int, addr: tuple, size: int, verdict: int) -> None: ...
    def on_path_response(self, peer: Peer, addr: tuple, token: int) -> None: ...
    def on_probe(self, peer: Peer, epoch: Epoch, link: int, addr: tuple, probe_id: int, size: int) -> None: ...
    def on_reorder_waiting(self, peer: Peer) -> None: ...


class ServerDataPath:
    """Authenticated packets in, payloads to the upstreams, replies sealed back.

    Reads each Peer's epochs and return path; owns the listen socket, the
    upstream sockets (one per session), the buffers and the batches.
    """

    def __init__(self, config: "ServerConfig", reactor: Reactor, log: Log, counters: Counters,
                 peers: Dict[int, Peer], control: ServerControl) -> None:
        self.config = config
        self.reactor = reactor
        self.log = log
        self.counters = counters
        self.peers = peers
        self.control = control
        self.listen_sock = None  # type: Optional[socket.socket]
        self._gro = False
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._bufs = [self._view]  # for recvmsg_into
        self._batch = SendBatch(self.counters)  # replies from upstreams, sealed for the client
        self._upstream_batch = SendBatch(self.counters, "upstream_full")  # payloads for one upstream socket
        self.fragmented = FragmentWarning()
        self.session_budget = 1 << 30  # sessions of all clients together: what the fd limit allows
        self.open_sessions = 0
        self._released = []  # type: List[Tuple[int, bytes]]  # by a ReorderBuffer, to forward
        self._waiting = {}  # type: Dict[int, Peer]  # by client id: early packets wait, after a drain
        for peer in peers.values():
            peer.on_upstream_error = (lambda p: lambda exc: self.upstream_error(p, exc))(peer)

    def open(self) -> None:
        self.listen_sock = open_listen_socket(self.config.listen_host, self.config.listen_port)
        self._gro = enable_gro(self.listen_sock)
        self.reactor.add_reader(self.listen_sock, self.on_listen_readable)
        self.session_budget = session_budget(raise_fd_limit())

    def close(self) -> None:
        for peer in self.peers.values():
            for session in list(peer.sessions.values()):
                self.close_session(session)
        if self.listen_sock is not None:
            self.reactor.remove_reader(self.listen_sock)
            self.listen_sock.close()
            self.listen_sock = None

    # -- link -> upstream ------------------------------------------------------

    def on_listen_readable(self) -> None:
        # Payloads for the upstream are gathered too, a batch per session
        # socket in a row, and sent when the drain ends.
        try:
            self._drain_listen_socket()
        finally:
            self._upstream_batch.flush()

    def _drain_listen_socket(self) -> None:
        buf, view = self._buf, self._view
        peers, counters, call_soon, control = self.peers, self.counters, self.reactor.call_soon, self.control
        batch_session = None  # the session the upstream batch is aimed at
        try:
            for off, n, addr in receive_datagrams(self.listen_sock, self._bufs, view, self._gro):
                if n < OVERHEAD:
                    counters.add("short")
                    continue
                type_flags, link, client_id, session_id, nonce = HEADER.unpack_from(buf, off)
                peer = peers.get(client_id)
                if peer is None:
                    counters.add("unknown_client")
                    continue
                kind = type_flags & TYPE_MASK
                if kind == TYPE_HELLO:
                    call_soon(control.on_hello, peer, link, addr, bytes(view[off:off + n]))
                    continue
                epoch = peer.epoch
                tag = nonce >> SEQ_BITS
                if epoch is None or epoch.tag != tag:
                    epoch = peer.pending.get(tag)
                    if epoch is None:
                        counters.add("stale_epoch")
                        continue
                seq = nonce & SEQ_MASK
                drop = epoch.open(view, off, n, seq)
                if drop:
                    counters.add(drop)
                    if (drop == "duplicate" and kind == TYPE_DATA and type_flags & COPIES_MASK
                            and epoch.authentic(view, off, n)):
                        peer.link(link).data_received += 1  # a copy (redundancy): its link carried it too
                    continue
                if epoch is not peer.epoch:  # the first packet under a pending epoch confirms it
                    peer.confirm(epoch)
                    call_soon(control.on_epoch_confirmed, peer, epoch)
                peer.packets += 1
                peer.rx_bytes += n
                if type_flags & FLAG_ACTIVE:
                    verdict = peer.return_path.observe(link, addr, seq, type_flags & COPIES_MASK, n)
                    if verdict:
                        call_soon(control.on_return_path, peer, epoch, link, addr, n, verdict)
                reorder = peer.reorder
                if reorder is not None and not reorder.in_order(seq, link, kind == TYPE_DATA):
                    if kind == TYPE_DATA:
                        peer.link(link).data_received += 1
                        batch_session = self._arrive_early(peer, seq, link, session_id,
                                                           view[off + HEADER_SIZE:off + n - MAC_SIZE])
                        continue
                    reorder.arrive(seq, link, None, self.reactor.time(), self._released)
                    batch_session = self._forward_released(peer, batch_session)
                if kind == TYPE_DATA:
                    peer.link(link).data_received += 1
                    batch_session = self._to_upstream(peer, session_id, view[off + HEADER_SIZE:off + n - MAC_SIZE],
                                                      batch_session)
                elif kind == TYPE_RESPONSE and n == OVERHEAD + PATH_TOKEN.size:
                    call_soon(control.on_path_response, peer, addr, PATH_TOKEN.unpack_from(buf, off + HEADER_SIZE)[0])
                elif kind == TYPE_HEARTBEAT and n == OVERHEAD + HEARTBEAT_PAYLOAD.size:
                    hb_seq, rate_kbps, client_sent, client_received, delay, hold_ms, client_ms = (
                        HEARTBEAT_PAYLOAD.unpack_from(buf, off + HEADER_SIZE))
                    call_soon(control.on_heartbeat, peer, epoch, link, addr, hb_seq, client_sent, client_received,
                              (rate_kbps, delay, hold_ms, client_ms), bool(type_flags & FLAG_ACTIVE))
                elif kind == TYPE_PROBE and n >= OVERHEAD + PROBE_PAYLOAD.size:
                    call_soon(control.on_probe, peer, epoch, link, addr,
                              PROBE_PAYLOAD.unpack_from(buf, off + HEADER_SIZE)[0], n)
                else:
                    counters.add("bad_type")
        except OSError as exc:
            self.socket_error("listen", exc)
        for peer in self._waiting.values():
            call_soon(control.on_reorder_waiting, peer)
        self._waiting.clear()

    # -- aggregate: the client's packets back in order -------------------------

    def _arrive_early(self, peer: Peer, seq: int, link: int, session_id: int, payload: memoryview
                      ) -> Optional[ServerSession]:
        """A DATA packet out of order: it waits (copied), or goes out late with what it
        releases; the session the upstream batch is aimed at after that."""
        peer.reorder.arrive(seq, link, (session_id, bytes(payload)), self.reactor.time(), self._released)
        return self._forward_released(peer, None)

    def _to_upstream(self, peer: Peer, session_id: int, payload: memoryview,
                     batch_session: Optional[ServerSession]) -> Optional[ServerSession]:
        """A payload for the session's upstream socket (opened if new): into the upstream
        batch, aimed anew when the session changes.  The session it is aimed at now."""
        session = peer.sessions.get(session_id) or self._open_session(peer, session_id)
        if session is None:
            return batch_session
        session.packets += 1
        if session is not batch_session:
            self._upstream_batch.aim(session.sock, CONNECTED_PEER, peer.on_upstream_error)
        self._upstream_batch.append(payload)
        return session

    def _forward_released(self, peer: Peer, batch_session: Optional[ServerSession]) -> Optional[ServerSession]:
        for session_id, payload in self._released:
            batch_session = self._to_upstream(peer, session_id, memoryview(payload), batch_session)
        del self._released[:]
        if peer.reorder is not None and peer.reorder.held:
            self._waiting[peer.client_id] = peer
        return batch_session

    def expire_reorder(self, peer: Peer, everything: bool = False) -> None:
        """The hold of the client's oldest early packet is over (a timer), or aggregation
        ends (`everything` waiting goes, in order)."""
        if peer.reorder is None:
            return
        peer.reorder.expire(float("inf") if everything else self.reactor.time(), self._released)
        try:
            self._forward_released(peer, None)
        finally:
            self._upstream_batch.flush()
        self._waiting.pop(peer.client_id, None)

    def _open_session(self, peer: Peer, session_id: int) -> Optional[ServerSession]:
        if len(peer.sessions) >= self.config.max_sessions:
            self.counters.add("session_limit")
            self.log.every("session-limit:%d" % peer.client_id, ERROR_LOG_INTERVAL_S, "warn",
                           "client %d: max_sessions (%d) reached, refusing a new session" % (
                               peer.client_id, self.config.max_sessions))
            return None
        upstream = peer.upstream
        if upstream.addr is None:
            self.counters.add("upstream_unresolved")
            return None
        if self.open_sessions >= self.session_budget and not self._make_room(peer):
            return None
        try:
            sock = self._upstream_socket(peer, upstream)
        except OSError as exc:
            self.socket_error("upstream", exc, upstream.text)
            return None
        session = ServerSession(session_id, peer, sock, self.reactor.time())
        peer.sessions[session_id] = session
        self.open_sessions += 1
        self.reactor.add_reader(sock, lambda: self.on_upstream_readable(session))
        self.log.debug("client %d: session %08x opened, upstream %s from %s" % (
            peer.client_id, session_id, upstream.text, format_address(sock.getsockname())))
        return session

    def _upstream_socket(self, peer: Peer, upstream: Endpoint) -> socket.socket:
        """A socket connected to the upstream: only its replies come in, and its ICMP errors.
        Out of file descriptors (another process took some), a session makes room once."""
        try:
            sock = open_udp_socket(upstream.family)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._make_room(peer):
                raise
            sock = open_udp_socket(upstream.family)
        try:
            sock.connect(upstream.addr)
        except OSError:
            sock.close()
            raise
        return sock

    def _make_room(self, peer: Peer) -> bool:
        """The file descriptors are all taken by sessions: close the least recently used
        session of the client that holds the most (on a tie, of `peer` itself), so no
        client can starve the others.  False if there is none to close."""
        greediest = max(self.peers.values(), key=lambda p: (len(p.sessions), p is peer))
        if not greediest.sessions:
            self.counters.add("session_budget")
            return False
        # No packet since the last sweep first, then the longest idle.
        victim = min(greediest.sessions.values(), key=lambda s: (s.packets != s.seen_packets, s.last_active))
        self.close_session(victim)
        self.counters.add("session_evicted")
        self.log.every("session-evicted", ERROR_LOG_INTERVAL_S, "warn",
                       "%d sessions use the file descriptors there are (ulimit -n): client %d's least "
                       "recently used session %08x closed for a new one of client %d" % (
                           self.open_sessions + 1, greediest.client_id, victim.id, peer.client_id))
        return True

    def close_session(self, session: ServerSession) -> None:
        if session.peer.sessions.pop(session.id, None) is not None:
            self.open_sessions -= 1
        self.reactor.remove_reader(session.sock)
        session.sock.close()

    # -- upstream -> link ------------------------------------------------------

    def on_upstream_readable(self, session: ServerSession) -> None:
        peer = session.peer
        epoch, path = peer.epoch, peer.return_path
        if epoch is None or not path.addrs:
            self._drain_without_path(session)
            return
        if peer.spreader is not None and len(path.links) > 1:
            self._send_spread(session, peer, epoch)
            return
        # Replies are sealed in place in the batch and leave together (SendBatch);
        # copies (redundancy) are the same bytes to each return address: the
        # client takes the first to arrive, whichever socket it comes in on.
        sock, batch = session.sock, self._batch
        buf, view = batch.buf, batch.view
        batch.aim(self.listen_sock, path.addrs, self._listen_error)
        bytes_before, packets_before = batch.sent_bytes, batch.sent_packets
        largest = 0
        while True:
            try:
                n = sock.recv_into(batch.room())
            except BlockingIOError:
                break
            except OSError as exc:  # ICMP port unreachable for an earlier send
                self.upstream_error(peer, exc)
                continue
            if n > FITS_1500_IPV6:
                if n > MAX_DATA_PAYLOAD:
                    self.counters.add("oversize")
                    continue
                self.fragmented.note(n, max_datagram_on([family_of(a) for a in path.addrs]), self.counters,
                                     self.log, "the upstream")
            if n > largest:
                largest = n
            session.packets += 1
            start = batch.end
            HEADER.pack_into(buf, start, TYPE_DATA, path.link, peer.client_id, session.id, epoch.next_nonce())
            end = start + HEADER_SIZE + n
            m = epoch.tx_mac.copy()
            m.update(view[start:end])
            buf[end:end + MAC_SIZE] = m.digest()
            batch.push(n + OVERHEAD)
        batch.flush()
        peer.largest_reply.note(largest)
        sent_bytes, sent = batch.sent_bytes - bytes_before, batch.sent_packets - packets_before
        peer.tx_bytes += sent_bytes
        peer.tx_packets += sent
        if sent:
            per_address = sent // len(path.addrs)
            for link, _addr in path.links:
                peer.link(link).data_sent += per_address
            if path.unvalidated:
                path.spent(sent_bytes // len(path.addrs))

    def _send_spread(self, session: ServerSession, peer: Peer, epoch: Epoch) -> None:
        """Aggregate: each reply on the carrying link where it would arrive first, as the
        client's heartbeats describe them (their rate and delay), sealed and sent on its own.
        Only validated addresses: a NAT that rebinds a link stalls that link's share for
        the round trip of its challenge."""
        sock, pick, listen_sock = session.sock, peer.spreader.pick, self.listen_sock
        pack_header, client_id, session_id = HEADER.pack_into, peer.client_id, session.id
        buf, view = self._buf, self._view
        payload_room = view[HEADER_SIZE:HEADER_SIZE + MAX_DATA_PAYLOAD + 1]
        choices, states = peer.spread_links()
        now = self.reactor.time()
        largest = 0
        while True:
            try:
                n = sock.recv_into(payload_room)
            except BlockingIOError:
                break
            except OSError as exc:
                self.upstream_error(peer, exc)
                continue
            if n > MAX_DATA_PAYLOAD:
                self.counters.add("oversize")
                continue
            if n > largest:
                largest = n
            session.packets += 1
            end = HEADER_SIZE + n
            link, addr = pick(choices, end + MAC_SIZE, now)
            epoch.tx_seq += 1  # sealed inline, as in the drains: once per datagram
            pack_header(buf, 0, TYPE_DATA, link, client_id, session_id, epoch.nonce_base | epoch.tx_seq)
            m = epoch.tx_mac.copy()
            m.update(view[:end])
            buf[end:end + MAC_SIZE] = m.digest()
            length = end + MAC_SIZE
            try:
                listen_sock.sendto(view[:length], addr)
            except BlockingIOError:
                self.counters.add("tx_full")
            except OSError as exc:
                self.socket_error("listen", exc)
            else:
                peer.tx_bytes += length
                peer.tx_packets += 1
                states[link].data_sent += 1
        peer.largest_reply.note(largest)

    def _drain_without_path(self, session: ServerSession) -> None:
        """Replies for a client whose return path is not known (yet, or any more): dropped."""
        room = self._view[HEADER_SIZE:HEADER_SIZE + MAX_DATA_PAYLOAD + 1]
        while True:
            try:
                session.sock.recv_into(room)
            except BlockingIOError:
                return
            except OSError as exc:
                self.upstream_error(session.peer, exc)
                continue
            session.packets += 1
            self.counters.add("no_return_path")

    # -- sending for control, and errors ---------------------------------------

    def send_control(self, packet: memoryview, addr: tuple, unfragmented: bool = False) -> None:
        """A handshake answer, an echo or a probe's answer, from the listen socket."""
        try:
            if unfragmented:
                send_unfragmented(self.listen_sock, packet, addr)
            else:
                self.listen_sock.sendto(packet, addr)
        except BlockingIOError:
            self.counters.add("tx_full")
        except OSError as exc:
            self.socket_error("listen", exc)

    def _listen_error(self, exc: OSError) -> None:
        self.socket_error("listen", exc)

    def upstream_error(self, peer: Peer, exc: OSError) -> None:
        """ECONNREFUSED: the upstream is not listening (yet)."""
        self.socket_error("upstream", exc, peer.upstream.text)

    def socket_error(self, what: str, exc: OSError, where: str = "") -> None:
        """Counted, and logged at a bounded rate: a socket error never stops the relay."""
        self.counters.add("%s_errors" % what)
        self.log.every("socket-error:" + what, ERROR_LOG_INTERVAL_S, "warn", "%s %s: %s" % (
            what, where or "socket", exc.strerror or exc))


class ServerHandshake:
    """Answers HELLOs: a COOKIE to one without a fresh cookie, else a WELCOME and a
    pending epoch (the essay above)."""

    def __init__(self, reactor: Reactor, log: Log, counters: Counters,
                 send: Callable[[memoryview, tuple], None]) -> None:
        self.reactor = reactor
        self.log = log
        self.counters = counters
        self.send = send
        self._secret = os.urandom(KEY_SIZE)  # for cookies; never leaves this process
        self._ctl = bytearray(OVERHEAD + WELCOME_PAYLOAD.size)
        self._cookies_by_prefix = RateLimiter(COOKIES_PER_PREFIX_PER_S, COOKIE_BURST_PER_PREFIX)
        self._cookies = RateLimiter(COOKIES_PER_S, COOKIE_BURST)

    def on_hello(self, peer: Peer, link: int, addr: tuple, packet: bytes) -> None:
        n = len(packet)
        if n != OVERHEAD + HELLO_PAYLOAD.size or not verify(peer.static.hello_mac, packet, n):
            self.counters.add("auth")
            return
        version = HEADER.unpack_from(packet)[4] & SEQ_MASK
        if version != PROTOCOL_VERSION:
            self.counters.add("old_version")
            self.log.every("client-version:%d" % peer.client_id, VERSION_LOG_INTERVAL_S, "error", (
                "client %d speaks wire protocol version %d, this server speaks %d: it is refused; run the same "
                "mpudp version on both ends" % (peer.client_id, version or 1, PROTOCOL_VERSION)))
            return
        client_nonce, cookie = HELLO_PAYLOAD.unpack_from(packet, HEADER_SIZE)
        tag = epoch_tag(client_nonce)
        if peer.epoch is not None and tag == peer.epoch.tag:
            self.counters.add("replay")  # the HELLO of the running epoch, or a forged look-alike
            return
        epoch = peer.pending.get(tag)
        if epoch is None or epoch.client_nonce != client_nonce:
            if not self._cookie_ok(peer, client_nonce, addr, cookie):
                self._send_cookie(peer, link, client_nonce, addr)
                return
            epoch = self._new_pending_epoch(peer, client_nonce)
            if epoch is None:
                return
        self._answer(peer, TYPE_WELCOME, link, client_nonce, epoch.server_nonce, addr)

    def _new_pending_epoch(self, peer: Peer, client_nonce: bytes) -> Optional[Epoch]:
        if client_nonce in peer.seen_hellos:
            self.counters.add("replay")  # an old HELLO: its epoch was used or evicted
            return None
        if peer.hello_budget <= 0:  # bounds the key derivations that HELLOs can cause
            self.counters.add("hello_limit")
            return None
        peer.hello_budget -= 1
        peer.seen_hellos[client_nonce] = True
        while len(peer.seen_hellos) > SEEN_HELLOS_PER_CLIENT:
            del peer.seen_hellos[next(iter(peer.seen_hellos))]
        epoch = Epoch(peer.static.secret, client_nonce, os.urandom(NONCE_SIZE), is_client=False)
        peer.pending.pop(epoch.tag, None)
        peer.pending[epoch.tag] = epoch
        while len(peer.pending) > PENDING_EPOCHS_PER_CLIENT:
            del peer.pending[next(iter(peer.pending))]
        return epoch

    def _send_cookie(self, peer: Peer, link: int, client_nonce: bytes, addr: tuple) -> None:
        now = self.reactor.time()
        if not (self._cookies_by_prefix.allow(source_prefix(addr), now) and self._cookies.allow(None, now)):
            self.counters.add("cookie_limit")  # a spoofed source's flood, or a burst of real ones: they retry
            return
        self._answer(peer, TYPE_COOKIE, link, client_nonce, self._cookie(peer, client_nonce, addr,
                                                                         self._cookie_period()), addr)

    def _answer(self, peer: Peer, kind: int, link: int, client_nonce: bytes, value: bytes, addr: tuple) -> None:
        """WELCOME(client nonce, server nonce) or COOKIE(client nonce, cookie): HELLO's size."""
        ctl = self._ctl
        WELCOME_PAYLOAD.pack_into(ctl, HEADER_SIZE, client_nonce, value)
        length = seal_into(ctl, peer.static.welcome_mac, kind, link, peer.client_id, 0, handshake_nonce(0),
                           WELCOME_PAYLOAD.size)
        self.send(memoryview(ctl)[:length], addr)

    # A cookie proves that a HELLO is fresh: a MAC, under a secret that never
    # leaves this process, of the client, its nonce, the address the HELLO came
    # from and the current period.  Making one needs no state, so answering a
    # replayed HELLO with a COOKIE costs nothing; only a HELLO that carries a
    # cookie made in the last one or two periods may create a pending epoch,
    # so HELLOs captured earlier can no longer use up a client's budget.

    def _cookie_period(self) -> int:
        return int(self.reactor.time() // COOKIE_PERIOD_S)

    def _cookie(self, peer: Peer, client_nonce: bytes, addr: tuple, period: int) -> bytes:
        m = blake2b(key=self._secret, digest_size=NONCE_SIZE)
        m.update(b"%d %d %s " % (peer.client_id, period, format_address(addr).encode()) + client_nonce)
        return m.digest()

    def _cookie_ok(self, peer: Peer, client_nonce: bytes, addr: tuple, cookie: bytes) -> bool:
        period = self._cookie_period()
        return any(compare_digest(cookie, self._cookie(peer, client_nonce, addr, p)) for p in (period, period - 1))


class Server(ServerControl):
    """The server side: wires the data path and the handshake, and keeps the peers."""

    def __init__(self, config: "ServerConfig", reactor: Reactor, log: Log, resolver: Resolver) -> None:
        self.config = config
        self.reactor = reactor
        self.log = log
        self.resolver = resolver
        self.counters = Counters()
        self._upstreams = {}  # type: Dict[str, Endpoint]
        self.peers = {}  # type: Dict[int, Peer]
        for client_id, secret in enumerate(config.static_secrets):
            self.peers[client_id] = Peer(client_id, secret, self._upstream(config.upstream_for(client_id)))
        self.data = ServerDataPath(config, reactor, log, self.counters, self.peers, self)
        self.handshake = ServerHandshake(reactor, log, self.counters, self.data.send_control)
        self._ctl = bytearray(OVERHEAD + ECHO_PAYLOAD.size)
        self._challenges = RateLimiter(CHALLENGES_PER_ADDRESS_PER_S, CHALLENGE_BURST)
        self._sweep_timer = None  # type: Optional[Periodic]
        self._drop_summary = None  # type: Optional[Periodic]
        self._last_drop_report = None  # type: Optional[Dict[str, int]]
        self.started_at = reactor.time()

    @property
    def listen_sock(self) -> Optional[socket.socket]:
        return self.data.listen_sock

    def _upstream(self, address: Tuple[str, str, int]) -> Endpoint:
        """The one Endpoint of an upstream address, shared by the clients that go there.
        New sessions use a changed address; established ones keep their socket."""
        text, host, port = address
        if text not in self._upstreams:
            self._upstreams[text] = Endpoint(text, host, port, lambda endpoint: None)
        return self._upstreams[text]

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.data.open()
        self.log.info("server listening on %s for %d client(s), upstream %s" % (
            format_address(self.listen_sock.getsockname()), len(self.peers),
            ", ".join(sorted(self._upstreams))))
        for endpoint in self._upstreams.values():
            endpoint.start(self.reactor, self.resolver, self.log, cfg.dns_refresh_interval_s)
        wanted = cfg.max_sessions * len(self.peers)
        if wanted > self.data.session_budget:
            self.log.warn("max_sessions %d x %d client(s) = %d sessions, but the open-file limit leaves room "
                          "for %d: they are shared, the client with the most gives way (raise LimitNOFILE "
                          "or ulimit -n)" % (cfg.max_sessions, len(self.peers), wanted, self.data.session_budget))
        self._sweep_timer = self.reactor.call_every(self._sweep_interval(), self._sweep)
        self._drop_summary = self.reactor.call_every(DROP_SUMMARY_INTERVAL_S, self._log_drops)

    def close(self) -> None:
        for periodic in (self._sweep_timer, self._drop_summary):
            if periodic is not None:
                periodic.cancel()
        for endpoint in self._upstreams.values():
            endpoint.close()
        for peer in self.peers.values():
            self.reactor.cancel(peer.path_line_timer)
            self.reactor.cancel(peer.reorder_timer)
        self.data.close()

    def _sweep_interval(self) -> float:
        cfg = self.config
        return min(SWEEP_INTERVAL_CEILING_S, cfg.heartbeat_timeout_s / 2, cfg.session_timeout_s / 4)

    # -- what the data path reports (after its drain) --------------------------

    def on_hello(self, peer: Peer, link: int, addr: tuple, packet: bytes) -> None:
        self.handshake.on_hello(peer, link, addr, packet)

    def on_epoch_confirmed(self, peer: Peer, epoch: Epoch) -> None:
        peer.epoch_at = self.reactor.time()
        self.log.info("client %d: new epoch %04x" % (peer.client_id, epoch.tag))

    def on_return_path(self, peer: Peer, epoch: Epoch, link: int, addr: tuple, size: int, verdict: int) -> None:
        """An ACTIVE packet moved the return path, or came from an address that must be
        challenged first (ReturnPath)."""
        if verdict == PATH_MOVED:
            self.on_return_path_moved(peer)
        elif verdict == PATH_CHALLENGE:
            self._challenge(peer, epoch, link, addr, size)

    def _challenge(self, peer: Peer, epoch: Epoch, link: int, addr: tuple, size: int) -> None:
        """CHALLENGE(token) to `addr`: only what sees it there can answer.  No larger than
        the packet that caused it, and at most CHALLENGES_PER_ADDRESS_PER_S per address."""
        candidate = peer.return_path.unvalidated.get(addr)
        if candidate is None or epoch is not peer.epoch or size < OVERHEAD + PATH_TOKEN.size:
            return
        if not self._challenges.allow((peer.client_id, addr), self.reactor.time()):
            return
        packet = seal(epoch.tx_mac, TYPE_CHALLENGE, link, peer.client_id, 0, epoch.next_nonce(),
                      PATH_TOKEN.pack(candidate.token))
        self.data.send_control(memoryview(packet), addr)

    def on_path_response(self, peer: Peer, addr: tuple, token: int) -> None:
        path = peer.return_path
        if addr not in path.unvalidated:
            return  # validated already (a copy), or never challenged
        if path.validate(addr, token):
            self.on_return_path_moved(peer)
        elif addr in path.unvalidated:
            self.counters.add("bad_response")

    def on_return_path_moved(self, peer: Peer) -> None:
        """Logged at a bounded rate: a NAT that alternates two source ports moves the path on
        every packet.  Past PATH_LINES_PER_INTERVAL lines, one line at the end of the
        interval says where replies go then, and how often they moved."""
        if peer.reorder is not None:  # the links the client's data comes on
            peer.reorder.carriers = tuple(link for link, _addr in peer.return_path.links)
        peer.path_moves += 1
        if peer.path_line_timer is not None:
            return  # that line is due already
        if self.log.allow("return-path:%d" % peer.client_id, PATH_LINE_INTERVAL_S, PATH_LINES_PER_INTERVAL):
            self._log_return_path(peer)
        else:
            peer.path_line_timer = self.reactor.call_later(PATH_LINE_INTERVAL_S, self._log_return_path, peer)

    def _log_return_path(self, peer: Peer) -> None:
        path, moves = peer.return_path, peer.path_moves
        peer.path_line_timer, peer.path_moves = None, 0
        if not path.links:
            return
        times = " (moved %d times since the last line)" % moves if moves > 1 else ""
        if peer.path_announced:
            self.log.info("client %d: replies now go by %s%s" % (peer.client_id, path.describe(), times))
        else:
            self.log.info("client %d: return path %s%s" % (peer.client_id, path.describe(), times))
            peer.path_announced = True

    def on_heartbeat(self, peer: Peer, epoch: Epoch, link: int, addr: tuple, hb_seq: int, client_sent: int,
                     client_received: int, spread: Tuple[int, int, int, int] = (0, 0, 0, 0),
                     active: bool = False) -> None:
        """Echo a heartbeat under the epoch it came in, with a bitmap of the last 32 on its
        link and our DATA counts on it, each way.  An ACTIVE one says whether the client
        aggregates (a rate), and how: its link's rate and delay, the reorder hold."""
        state = peer.link(link)
        rate_kbps, delay, hold_ms, client_ms = spread
        if active:
            self._aggregate(peer, state, rate_kbps, delay, hold_ms)
        last, bitmap = state.hb_last, state.hb_bitmap
        if not last or hb_seq + 32 <= last or hb_seq > last + 0x7FFFFFFF:
            last, bitmap = hb_seq, 0  # first, or the client restarted its count
        if hb_seq > last:
            gap = hb_seq - last
            bitmap = ((bitmap << gap) | 1) & 0xFFFFFFFF if gap < 32 else 1  # never a huge shift
            last = hb_seq
        else:
            bitmap |= 1 << (last - hb_seq)
        state.hb_last, state.hb_bitmap = last, bitmap
        state.client_sent, state.client_received = client_sent, client_received
        ctl = self._ctl
        ECHO_PAYLOAD.pack_into(ctl, HEADER_SIZE, hb_seq, (bitmap >> (last - hb_seq)) & 0xFFFFFFFF,
                               state.data_received & COUNT_MASK, state.data_sent & COUNT_MASK,
                               peer.largest_reply.value(self.reactor.time()),
                               state.up_queue_ms(client_ms, self.reactor.time()))
        length = seal_into(ctl, epoch.tx_mac, TYPE_ECHO, link, peer.client_id, 0, epoch.next_nonce(),
                           ECHO_PAYLOAD.size)
        self.data.send_control(memoryview(ctl)[:length], addr)

    def _aggregate(self, peer: Peer, state: PeerLink, rate_kbps: int, delay: int, hold_ms: int) -> None:
        if not rate_kbps:
            if peer.spreader is not None:
                self.log.info("client %d: replies on one link again (no aggregate)" % peer.client_id)
                peer.spreader = None
                self.data.expire_reorder(peer, everything=True)
                peer.reorder = None
            return
        if peer.spreader is None:
            self.log.info("client %d aggregates: replies spread over its carrying links" % peer.client_id)
            peer.spreader = Spreader()
            peer.reorder = ReorderBuffer()
        state.rate = rate_kbps * 1000 / 8
        state.delay_s = delay * OWD_UNIT_S
        peer.estimates_changed()
        peer.reorder.hold_s = min(REORDER_HOLD_CAP_S, hold_ms / 1000)
        peer.reorder.carriers = tuple(link for link, _addr in peer.return_path.links)

    def on_reorder_waiting(self, peer: Peer) -> None:
        peer.reorder_timer = hold_timer(self.reactor, peer.reorder, peer.reorder_timer, self._reorder_hold_over, peer)

    def _reorder_hold_over(self, peer: Peer) -> None:
        peer.reorder_timer = None
        self.data.expire_reorder(peer)
        self.on_reorder_waiting(peer)

    def on_probe(self, peer: Peer, epoch: Epoch, link: int, addr: tuple, probe_id: int, size: int) -> None:
        """Answer a path-MTU probe with its id, padded to its size, DF set, to where it came
        from: an answer proves the size passes both ways.  Never larger than the probe."""
        packet = bytearray(size)
        PROBE_PAYLOAD.pack_into(packet, HEADER_SIZE, probe_id)
        seal_into(packet, epoch.tx_mac, TYPE_PROBE_ACK, link, peer.client_id, 0, epoch.next_nonce(), size - OVERHEAD)
        self.data.send_control(memoryview(packet), addr, unfragmented=True)

    # -- housekeeping ----------------------------------------------------------

    def _sweep(self) -> None:
        now = self.reactor.time()
        for peer in self.peers.values():
            peer.hello_budget = HELLOS_PER_SWEEP
            if peer.packets != peer.seen_packets:
                peer.seen_packets = peer.packets
                peer.last_heard = now
            elif (peer.return_path.addr is not None and peer.last_heard is not None
                  and now - peer.last_heard >= self.config.heartbeat_timeout_s):
                peer.return_path.clear()
                peer.path_announced = False
                self.log.info("client %d silent for %.0fs: return path dropped" % (
                    peer.client_id, now - peer.last_heard))
            self._expire_sessions(peer, now)
        self._write_status_file()

    def _expire_sessions(self, peer: Peer, now: float) -> None:
        for session in list(peer.sessions.values()):
            if session.packets != session.seen_packets:
                session.seen_packets = session.packets
                session.last_active = now
            elif now - session.last_active >= self.config.session_timeout_s:
                self.data.close_session(session)
                self.log.debug("client %d: session %08x expired" % (peer.client_id, session.id))

    def _log_drops(self) -> None:
        self._last_drop_report = log_counter_summary(self.log, "server", self.counters, self._last_drop_report)

    def status(self) -> Dict[str, Any]:
        now = self.reactor.time()
        clients = []
        for peer in self.peers.values():
            path = peer.return_path
            clients.append({
                "client_id": peer.client_id,
                "epoch": "%04x" % peer.epoch.tag if peer.epoch else None,
                "return_link": path.link if path.addr else None,
                "return_addr": format_address(path.addr),
                "return_links": [[link, format_address(addr)] for link, addr in path.links] if path.addr else [],
                "unvalidated": [format_address(addr) for addr in path.unvalidated],
                "upstream": peer.upstream.text,
                "sessions": len(peer.sessions),
                "last_seen_age_s": None if peer.last_heard is None else round(now - peer.last_heard, 1),
                "handshake_age_s": None if peer.epoch_at is None else round(now - peer.epoch_at, 1),
                "rx_packets": peer.packets, "rx_bytes": peer.rx_bytes,
                "tx_packets": peer.tx_packets, "tx_bytes": peer.tx_bytes,
                "aggregate": peer.spreader is not None,
                "reorder": reorder_status(peer.reorder),
                "data_sent_by_link": {str(link): state.data_sent for link, state in sorted(peer.links.items())},
            })
        return {"mode": "server", "pid": os.getpid(), "clients": clients, "counters": dict(self.counters),
                "uptime_s": round(now - self.started_at, 1),
                "sessions": self.data.open_sessions, "session_budget": min(self.data.session_budget, 1 << 30)}

    def metrics(self) -> "List[Metric]":
        """The status as Prometheus metrics (prometheus_text)."""
        now = self.reactor.time()

        def age(at: Optional[float]) -> float:
            return now - at if at is not None else float("inf")

        per_client = [
            ("mpudp_client_last_seen_age_seconds", "gauge",
             "Seconds since the client was last heard, to a sweep (+Inf: never).", lambda p: age(p.last_heard)),
            ("mpudp_client_handshake_age_seconds", "gauge", "Seconds since its epoch was confirmed (+Inf: none).",
             lambda p: age(p.epoch_at)),
            ("mpudp_client_sessions", "gauge", "Its sessions (upstream sockets).", lambda p: len(p.sessions)),
            ("mpudp_client_return_links", "gauge", "Links its replies go back on (0: no return path).",
             lambda p: len(p.return_path.links) if p.return_path.addr else 0),
            ("mpudp_client_received_packets_total", "counter", "Authenticated packets received from it.",
             lambda p: p.packets),
            ("mpudp_client_received_bytes_total", "counter", "Their bytes.", lambda p: p.rx_bytes),
            ("mpudp_client_sent_packets_total", "counter", "Replies sent to it (each copy).", lambda p: p.tx_packets),
            ("mpudp_client_sent_bytes_total", "counter", "Their bytes.", lambda p: p.tx_bytes),
        ]  # type: List[Tuple[str, str, str, Callable[[Peer], float]]]
        metrics = [
            ("mpudp_uptime_seconds", "gauge", "Seconds since the server started.", [({}, now - self.started_at)]),
            ("mpudp_sessions", "gauge", "Sessions of all clients.", [({}, self.data.open_sessions)]),
            ("mpudp_session_budget", "gauge", "Sessions the open-file limit leaves room for.",
             [({}, min(self.data.session_budget, 1 << 30))]),
        ]  # type: List[Metric]
        for name, kind, help_text, read in per_client:
            metrics.append((name, kind, help_text, [({"client": p.client_id}, float(read(p)))
                                                    for p in self.peers.values()]))
        return metrics + [drop_metrics(self.counters)]

    def status_lines(self) -> List[str]:
        return server_status_lines(self.status())

    def _write_status_file(self) -> None:
        cfg = self.config
        write_status_files(self.log, cfg.status_file, self.status, cfg.metrics_file, self.metrics)

    def reconfigure(self, new: "ServerConfig") -> None:
        """Apply a reloaded config (keys and listen address unchanged): timeouts, limits,
        upstreams (new sessions use a changed upstream; running ones keep theirs)."""
        self.config = self.data.config = new
        for peer in self.peers.values():
            address = new.upstream_for(peer.client_id)
            if address[0] != peer.upstream.text:
                known = address[0] in self._upstreams
                peer.upstream = self._upstream(address)
                if not known:
                    peer.upstream.start(self.reactor, self.resolver, self.log, new.dns_refresh_interval_s)
                self.log.info("reload: client %d now goes to upstream %s" % (peer.client_id, address[0]))
        in_use = {peer.upstream.text for peer in self.peers.values()}
        for text in [t for t in self._upstreams if t not in in_use]:
            self._upstreams.pop(text).close()
        self._sweep_timer.interval = self._sweep_interval()


# ============================================================================
# Config
# ============================================================================
#
# The original's JSON keys with the same meaning, plus keys for keys,
# sessions and clients (README, "Configuration").  Only the section named by
# "mode" is read.  Every problem names its key path; all are reported at once.

REQUIRED = object()
MAX_CONFIG_BYTES = 16 << 20  # 65535 client keys take about 3.2 MB; /dev/zero takes forever
MAX_STATUS_BYTES = 64 << 20  # a server's status with 65535 clients

CLIENT_DEFAULTS = {
    "heartbeat_interval_sec": 1.0,
    "loss_weight": 5.0,
    "rtt_weight": 1.0,
    "switch_threshold": 25.0,
    "throughput_threshold_kbps": 500.0,
    "max_consecutive_fail": 5,
    "dns_refresh_interval_sec": 600.0,
    "debug": False,
    "client_id": 0,
    "score_file": "",
    "metrics_file": "",
    "session_timeout_sec": 180.0,
    "max_sessions": 1024,
    "log_target": "stderr",
    "redundancy": 1,
    "aggregate": False,
}

SERVER_DEFAULTS = {
    "heartbeat_timeout_sec": 10.0,
    "status_file": "",
    "metrics_file": "",
    "session_timeout_sec": 180.0,
    "max_sessions": 1024,
    "dns_refresh_interval_sec": 600.0,
    "debug": False,
    "log_target": "stderr",
}

KEY_HELP = "generate one with: python3 keygen.py"


class _Section:
    """Reads one JSON object, collecting errors by key path instead of stopping at the first."""

    def __init__(self, data: Any, path: str, errors: List[str], warnings: List[str]) -> None:
        self.path = path
        self.errors = errors
        self.warnings = warnings
        if data is None:
            data = {}  # missing: the caller has said so already
        elif not isinstance(data, dict):
            self.error("", "must be a JSON object")
            data = {}
        self.data = data
        self.used = set()  # type: set

    def key_path(self, key: str) -> str:
        return "%s.%s" % (self.path, key) if key else self.path

    def error(self, key: str, message: str) -> None:
        self.errors.append("%s: %s" % (self.key_path(key), message))

    def get(self, key: str, kind: str, default: Any = REQUIRED) -> Any:
        """The value of `key` checked to be of `kind`: str, int, number, bool, list, object."""
        self.used.add(key)
        if key not in self.data:
            if default is REQUIRED:
                self.error(key, "is required")
            return None if default is REQUIRED else default
        value = self.data[key]
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "list": isinstance(value, list),
            "object": isinstance(value, dict),
        }[kind]
        if not ok:  # name the type only: the value may be a misplaced private key
            self.error(key, "must be %s, not %s" % (_KIND_NAMES[kind], _json_type(value)))
            return None if default is REQUIRED else default
        return value

    def number(self, key: str, default: Any, minimum: float, allow_zero: bool = False) -> Any:
        value = self.get(key, "number", default)
        if isinstance(value, int) and value.bit_length() > 64:  # math.isfinite would overflow
            self.error(key, "is too large")
            return default if default is not REQUIRED else None
        if value is not None and not math.isfinite(value):
            self.error(key, "must be a finite number")
            return default if default is not REQUIRED else None
        if value is not None and not (value >= minimum or (allow_zero and value == 0)):
            self.error(key, "must be at least %g%s" % (minimum, " (or 0 for never)" if allow_zero else ""))
        return value

    def integer(self, key: str, default: Any, minimum: int, maximum: int) -> Any:
        value = self.get(key, "int", default)
        if value is not None and not minimum <= value <= maximum:
            self.error(key, "must be from %d to %d" % (minimum, maximum))
        return value

    def address(self, key: str, listen: bool = False) -> Optional[Tuple[str, str, int]]:
        """(text, host, port) of a "host:port", "[v6]:port" or (listen only) ":port" value."""
        text = self.get(key, "str")
        if text is None:
            return None
        try:
            host, port = split_host_port(text)
        except ValueError as exc:
            self.error(key, "%r: %s" % (text, exc))
            return None
        if not listen and (not host or port == 0):
            self.error(key, "%r: needs a host and a port from 1 to 65535" % text)
            return None
        problem = host_problem(host)
        if problem:
            self.error(key, "%r: %s" % (text[:80], problem))
            return None
        return text, host, port

    def key(self, key: str) -> Optional[bytes]:
        text = self.get(key, "str")
        if text is None:
            return None
        if text.startswith("PASTE"):  # the example config.json's placeholders
            self.error(key, "still the example's placeholder: generate the keys first (python3 keygen.py "
                       "on each side) and paste them in")
            return None
        try:
            return decode_key(text)
        except ProtocolError as exc:
            self.error(key, "%s; %s" % (exc, KEY_HELP))
            return None

    def finish(self, also_known: Sequence[str] = ()) -> None:
        """Warn about keys nobody asked for, with the closest known key as a hint."""
        known = sorted(self.used | set(also_known))
        for key in self.data:
            if key not in self.used and key not in also_known:
                close = get_close_matches(key, known, n=1)
                self.warnings.append("%s: unknown key%s" % (
                    self.key_path(key), "; did you mean %r?" % close[0] if close else ""))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


_KIND_NAMES = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
               "list": "a list", "object": "an object"}


class LinkConfig:
    """One entry of client.links: where it goes, and how its socket leaves this host."""

    def __init__(self, remote_addr: str, host: str, port: int, priority: float,
                 bind_interface: str = "", bind_addr: Optional[Tuple[str, int, tuple]] = None,
                 fwmark: int = 0) -> None:
        self.remote_addr, self.host, self.port, self.priority = remote_addr, host, port, priority
        self.bind_interface = bind_interface
        self.bind_addr = bind_addr  # (text, family, sockaddr) or None: any address, any port
        self.fwmark = fwmark

    @property
    def bound(self) -> bool:
        """Any of bind_interface, bind_addr, fwmark set."""
        return self.socket_options != ("", None, 0)

    @property
    def socket_options(self) -> tuple:
        """What a link's socket is made with: a reload that changes it makes a new link.
        The address as parsed, so "192.0.2.7" and "192.0.2.7:0" are the same."""
        return (self.bind_interface, self.bind_addr[2] if self.bind_addr else None, self.fwmark)


class CommonConfig:
    """The keys both sections have (README, "Configuration"); filled in by _read_common."""

    listen_addr = ""  # as written
    listen_host = ""
    listen_port = 0
    debug = False
    log_target = "stderr"
    session_timeout_s = 180.0
    max_sessions = 1024
    dns_refresh_interval_s = 600.0
    metrics_file = ""


class ClientConfig(CommonConfig):
    """The client section, checked; `static_secret` is derived from the keys."""

    links = []  # type: List[LinkConfig]
    redundancy = 1  # type: Any  # 1..MAX_REDUNDANCY or "auto"
    aggregate = False  # spread data over every steady link (Spreader), both ways
    heartbeat_interval_s = 1.0
    loss_weight = 5.0
    rtt_weight = 1.0
    switch_threshold = 25.0
    throughput_threshold_kbps = 500.0
    max_consecutive_fail = 5
    client_id = 0
    score_file = ""
    private_key = None  # type: Optional[bytes]
    server_public_key = None  # type: Optional[bytes]
    static_secret = b""

    def __repr__(self) -> str:  # never print keys
        return "ClientConfig(listen_addr=%r, links=%d)" % (self.listen_addr, len(self.links))


class ServerConfig(CommonConfig):
    """The server section, checked; `static_secrets[i]` belongs to client id i."""

    heartbeat_timeout_s = 10.0
    status_file = ""
    private_key = None  # type: Optional[bytes]
    client_public_keys = []  # type: List[bytes]
    static_secrets = []  # type: List[bytes]
    upstream = None  # type: Optional[Tuple[str, str, int]]  # (text, host, port)
    upstream_addrs = None  # type: Optional[List[Tuple[str, str, int]]]  # per client id, if given

    def __repr__(self) -> str:
        return "ServerConfig(listen_addr=%r, clients=%d)" % (self.listen_addr, len(self.client_public_keys))

    def upstream_for(self, client_id: int) -> Tuple[str, str, int]:
        if self.upstream_addrs and client_id < len(self.upstream_addrs):
            return self.upstream_addrs[client_id]
        return self.upstream


class Config:
    def __init__(self, mode: str, section: Any, warnings: List[str], path: str) -> None:
        self.mode, self.section, self.warnings, self.path = mode, section, warnings, path


def _read_common(section: _Section, cfg: Any, defaults: Dict[str, Any]) -> None:
    cfg.debug = section.get("debug", "bool", defaults["debug"])
    cfg.log_target = section.get("log_target", "str", defaults["log_target"])
    if cfg.log_target not in ("stderr", "syslog"):
        section.error("log_target", "must be \"stderr\" or \"syslog\"")
    cfg.session_timeout_s = section.number("session_timeout_sec", defaults["session_timeout_sec"], 1.0)
    cfg.max_sessions = section.integer("max_sessions", defaults["max_sessions"], 1, 1 << 20)
    cfg.dns_refresh_interval_s = section.number("dns_refresh_interval_sec", defaults["dns_refresh_interval_sec"],
                                                1.0, allow_zero=True)
    cfg.metrics_file = section.get("metrics_file", "str", defaults["metrics_file"])


def _read_client(section: _Section, top_debug: bool) -> ClientConfig:
    d = CLIENT_DEFAULTS
    cfg = ClientConfig()
    listen = section.address("listen_addr", listen=True)
    cfg.listen_addr, cfg.listen_host, cfg.listen_port = listen or ("", "", 0)
    cfg.links = []
    links = section.get("links", "list")
    if links is not None and not links:
        section.error("links", "needs at least one link")
    for i, item in enumerate(links or []):
        link = _Section(item, "%s.links[%d]" % (section.path, i), section.errors, section.warnings)
        remote = link.address("remote_addr")
        priority = link.number("priority", 0, -1e9)
        bind_interface, bind_addr, fwmark = _read_link_socket_options(link, remote)
        link.finish()
        if remote is not None:
            cfg.links.append(LinkConfig(remote[0], remote[1], remote[2], priority,
                                        bind_interface, bind_addr, fwmark))
    if len(cfg.links) > 255:
        section.error("links", "at most 255 links")
    cfg.redundancy = _read_redundancy(section)
    cfg.aggregate = section.get("aggregate", "bool", d["aggregate"])
    if cfg.aggregate and cfg.redundancy != 1:
        section.error("aggregate", "true cannot go with redundancy %s: aggregate spreads the packets over the "
                      "links, redundancy copies each on several; set one of them" % json.dumps(cfg.redundancy))
    cfg.heartbeat_interval_s = section.number("heartbeat_interval_sec", d["heartbeat_interval_sec"], 0.05)
    cfg.loss_weight = section.number("loss_weight", d["loss_weight"], 0)
    cfg.rtt_weight = section.number("rtt_weight", d["rtt_weight"], 0)
    cfg.switch_threshold = section.number("switch_threshold", d["switch_threshold"], 0)
    cfg.throughput_threshold_kbps = section.number("throughput_threshold_kbps", d["throughput_threshold_kbps"], 0)
    cfg.max_consecutive_fail = section.integer("max_consecutive_fail", d["max_consecutive_fail"], 1, 1000)
    cfg.client_id = section.integer("client_id", d["client_id"], 0, 0xFFFF)
    cfg.score_file = section.get("score_file", "str", d["score_file"])
    _read_common(section, cfg, d)
    cfg.debug = cfg.debug or top_debug
    cfg.private_key = section.key("client_private_key")
    cfg.server_public_key = section.key("server_public_key")
    section.finish()
    if cfg.private_key is not None and cfg.server_public_key is not None:
        try:
            own_public = public_key(cfg.private_key)
            cfg.static_secret = static_secret(cfg.private_key, cfg.server_public_key, own_public,
                                              cfg.server_public_key)
        except ProtocolError as exc:
            section.error("server_public_key", str(exc))
    return cfg


def _read_link_socket_options(link: _Section, remote: Optional[Tuple[str, str, int]]
                              ) -> Tuple[str, Optional[Tuple[str, int, tuple]], int]:
    """bind_interface, bind_addr and fwmark of one link, checked (the socket applies them)."""
    linux_only = "is Linux-only (SO_BINDTODEVICE / SO_MARK), not available on %s" % sys.platform
    bind_interface = link.get("bind_interface", "str", "")
    if bind_interface and not sys.platform.startswith("linux"):
        link.error("bind_interface", linux_only)
    elif bind_interface and (len(bind_interface.encode()) > 15 or "/" in bind_interface
                             or not bind_interface.isprintable() or any(c.isspace() for c in bind_interface)):
        link.error("bind_interface", "%r is not an interface name (at most 15 bytes, printable, no '/' or spaces)"
                   % bind_interface[:40])
    fwmark = link.get("fwmark", "int", 0) if not isinstance(link.data.get("fwmark"), str) else None
    if fwmark is None:  # "0x100", as ip rule and mwan3 write marks
        text = link.get("fwmark", "str")
        try:
            fwmark = int(text, 0)
        except ValueError:
            link.error("fwmark", "%r is not a number (decimal, or hex as \"0x100\")" % text)
            fwmark = 0
    if not 0 <= fwmark <= 0xFFFFFFFF:
        link.error("fwmark", "must be from 0 to 0xffffffff")
        fwmark = 0
    if fwmark and not sys.platform.startswith("linux"):
        link.error("fwmark", linux_only)
    bind_addr = None
    text = link.get("bind_addr", "str", "")
    if text:
        found = numeric_address(text, 0)  # a bare address, IPv6 without brackets too
        if found is None:
            try:
                host, port = split_host_port(text)
                found = numeric_address(host, port)
            except ValueError:
                pass
        if found is None:
            link.error("bind_addr", "%r: needs an IP address of this host, optionally with :port "
                       "(\"192.0.2.7\", \"192.0.2.7:40000\", \"[2001:db8::7]:40000\")" % text)
        else:
            bind_addr = (text, found[0], found[1])
            remote_numeric = numeric_address(remote[1], remote[2]) if remote else None
            if remote_numeric is not None and remote_numeric[0] != found[0]:
                link.error("bind_addr", "%r is IPv%s but remote_addr %r is IPv%s" % (
                    text, 6 if found[0] == socket.AF_INET6 else 4, remote[0],
                    6 if remote_numeric[0] == socket.AF_INET6 else 4))
    return bind_interface, bind_addr, fwmark


def _read_redundancy(section: _Section) -> Any:
    """1..MAX_REDUNDANCY copies of every packet, or "auto" (a second copy while the active link loses)."""
    if isinstance(section.data.get("redundancy"), str):
        value = section.get("redundancy", "str")
        if value != "auto":
            section.error("redundancy", "must be a number of links from 1 to %d, or \"auto\"" % MAX_REDUNDANCY)
            return 1
        return value
    return section.integer("redundancy", CLIENT_DEFAULTS["redundancy"], 1, MAX_REDUNDANCY)


def _read_server(section: _Section, top_debug: bool) -> ServerConfig:
    d = SERVER_DEFAULTS
    cfg = ServerConfig()
    listen = section.address("listen_addr", listen=True)
    cfg.listen_addr, cfg.listen_host, cfg.listen_port = listen or ("", "", 0)
    cfg.heartbeat_timeout_s = section.number("heartbeat_timeout_sec", d["heartbeat_timeout_sec"], 0.1)
    cfg.status_file = section.get("status_file", "str", d["status_file"])
    _read_common(section, cfg, d)
    cfg.debug = cfg.debug or top_debug
    cfg.private_key = section.key("server_private_key")
    cfg.client_public_keys = _read_client_keys(section)
    cfg.upstream_addrs = None
    if "upstream_addrs" in section.data:
        addrs = section.get("upstream_addrs", "list") or []
        holder = _Section({"upstream_addrs[%d]" % i: v for i, v in enumerate(addrs)}, section.path,
                          section.errors, section.warnings)
        cfg.upstream_addrs = [holder.address("upstream_addrs[%d]" % i) for i in range(len(addrs))]
        cfg.upstream_addrs = [a for a in cfg.upstream_addrs if a is not None]
    needs_default = cfg.upstream_addrs is None or len(cfg.upstream_addrs) < len(cfg.client_public_keys)
    cfg.upstream = section.address("upstream_addr") if needs_default or "upstream_addr" in section.data else None
    section.finish(also_known=("client_public_key", "client_public_keys", "upstream_addrs"))
    cfg.static_secrets = []
    if cfg.private_key is not None:
        own_public = public_key(cfg.private_key)
        for i, client_public in enumerate(cfg.client_public_keys):
            try:
                cfg.static_secrets.append(static_secret(cfg.private_key, client_public, client_public, own_public))
            except ProtocolError as exc:
                section.error("client_public_keys[%d]" % i, str(exc))
    return cfg


def _read_client_keys(section: _Section) -> List[bytes]:
    if "client_public_keys" in section.data:
        keys = section.get("client_public_keys", "list")
        if keys is None:
            return []  # the wrong type, reported already
        if not keys:
            section.error("client_public_keys", "needs at least one key")
        holder = _Section({"client_public_keys[%d]" % i: k for i, k in enumerate(keys)}, section.path,
                          section.errors, section.warnings)
        found = [holder.key("client_public_keys[%d]" % i) for i in range(len(keys))]
        if len(found) > 0xFFFF:
            section.error("client_public_keys", "at most 65535 clients")
        return [k for k in found if k is not None]
    if "client_public_key" in section.data:
        key = section.key("client_public_key")
        return [key] if key is not None else []
    section.error("client_public_keys", "is required (a list of the clients' public keys; the index is the client_id)")
    return []


def parse_config(data: Any, path: str = "config") -> Config:
    """Check a parsed JSON config; ConfigError lists every problem, one per line."""
    if not isinstance(data, dict):
        raise ConfigError("%s: must be a JSON object (with \"mode\" and its section), not %s" % (
            path, json.dumps(data)[:40]))
    errors, warnings = [], []  # type: List[str], List[str]
    top = _Section(data, "", errors, warnings)
    mode = top.get("mode", "str")
    top_debug = top.get("debug", "bool", False)
    section = None
    if mode in ("client", "server"):
        sub = _Section(top.get(mode, "object"), mode, errors, warnings)
        section = _read_client(sub, top_debug) if mode == "client" else _read_server(sub, top_debug)
    elif mode is not None:
        errors.append("mode: must be \"client\" or \"server\", not %s" % json.dumps(mode))
    top.finish(also_known=("client", "server"))
    errors = [e.lstrip(".") for e in errors]
    if errors:
        raise ConfigError("\n".join(errors))
    return Config(mode, section, [w.lstrip(".") for w in warnings], path)


def read_json_file(path: str, what: str, max_bytes: int) -> Any:
    """The JSON value in the regular file at `path`, of at most `max_bytes`.  Anything else
    (a FIFO, a device, a huge or binary file, nesting past the parser's depth) is a
    ConfigError saying so in one line: these files are input, and input can be wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except OSError as exc:
        raise ConfigError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError("%s: not a regular file" % path)
        raw = os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise ConfigError("%s: larger than %d bytes: not %s" % (path, max_bytes, what))
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: not UTF-8 text (byte %d)" % (path, exc.start)) from None
    except ValueError as exc:
        raise ConfigError("%s: not valid JSON: %s" % (path, exc)) from None
    except RecursionError:
        raise ConfigError("%s: not valid JSON: nested too deeply" % path) from None


def load_config(path: str) -> Config:
    """Read and check the config file at `path`."""
    config = parse_config(read_json_file(path, "a config file", MAX_CONFIG_BYTES), path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return config
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        config.warnings.append("%s: writable by other users, who could change where the traffic goes "
                               "or replace the keys; chmod 600 %s" % (path, path))
    elif mode & (stat.S_IRGRP | stat.S_IROTH):
        config.warnings.append("%s: readable by other users, but it holds a private key; "
                               "chmod 600 %s" % (path, path))
    return config


# ============================================================================
# Demo: a server, a client, two emulated links and an echo in one process
# ============================================================================


class DemoLink:
    """A loopback UDP proxy standing for one path, with settable delay and blackhole."""

    def __init__(self, reactor: Reactor, target: tuple) -> None:
        self.reactor = reactor
        self.target = target
        self.delay_s = 0.0
        self.blackhole = False
        self.listen = open_udp_socket(socket.AF_INET, ("127.0.0.1", 0))
        self.upstream = open_udp_socket(socket.AF_INET, ("127.0.0.1", 0))
        self.client_addr = None  # type: Optional[tuple]
        reactor.add_reader(self.listen, self._from_client)
        reactor.add_reader(self.upstream, self._from_server)

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.listen.getsockname()[1]

    def _from_client(self) -> None:
        for data, addr in _drain(self.listen):
            self.client_addr = addr
            self._pass(self.upstream, data, self.target)

    def _from_server(self) -> None:
        for data, _addr in _drain(self.upstream):
            if self.client_addr is not None:
                self._pass(self.listen, data, self.client_addr)

    def _pass(self, sock: socket.socket, data: bytes, addr: tuple) -> None:
        if self.blackhole:
            return
        if self.delay_s:
            self.reactor.call_later(self.delay_s, _send_quietly, sock, data, addr)
        else:
            _send_quietly(sock, data, addr)

    def close(self) -> None:
        for sock in (self.listen, self.upstream):
            self.reactor.remove_reader(sock)
            sock.close()


def _drain(sock: socket.socket):
    while True:
        try:
            yield sock.recvfrom(65536)
        except BlockingIOError:
            return
        except OSError:
            continue


def _send_quietly(sock: socket.socket, data: bytes, addr: tuple) -> None:
    try:
        sock.sendto(data, addr)
    except OSError:
        pass


def run_demo(seconds: float = 12.0, out=None) -> int:
    """Relay an echo stream over two loopback links; degrade one, then kill the other."""
    out = out or sys.stdout
    log = Log(stream=out)
    reactor = Reactor(log=log)
    resolver = Resolver(reactor)
    echo = open_udp_socket(socket.AF_INET, ("127.0.0.1", 0))
    def echo_back() -> None:
        for data, addr in _drain(echo):
            _send_quietly(echo, data, addr)

    reactor.add_reader(echo, echo_back)
    server_key, client_key = generate_private_key(), generate_private_key()
    server = Server(parse_config({"mode": "server", "server": {
        "listen_addr": "127.0.0.1:0", "upstream_addr": "127.0.0.1:%d" % echo.getsockname()[1],
        "server_private_key": encode_key(server_key),
        "client_public_keys": [encode_key(public_key(client_key))]}}).section, reactor, log, resolver)
    server.start()
    links = [DemoLink(reactor, server.listen_sock.getsockname()) for _ in range(2)]
    client = Client(parse_config({"mode": "client", "client": {
        "listen_addr": "127.0.0.1:0", "links": [{"remote_addr": link.address} for link in links],
        "heartbeat_interval_sec": 0.2, "client_private_key": encode_key(client_key),
        "server_public_key": encode_key(public_key(server_key))}}).section, reactor, log, resolver)
    client.start()
    app = open_udp_socket(socket.AF_INET, ("127.0.0.1", 0))
    stats = {"sent": 0, "received": 0, "last_rx": None, "gap": 0.0}
    start = reactor.time()

    def on_reply() -> None:
        for _data, _addr in _drain(app):
            now = reactor.time()
            if stats["last_rx"] is not None and stats["received"] > 0:
                stats["gap"] = max(stats["gap"], now - stats["last_rx"])
            stats["last_rx"] = now
            stats["received"] += 1

    def send() -> None:
        stats["sent"] += 1
        _send_quietly(app, b"ping %d" % stats["sent"], client.listen_sock.getsockname())

    def report() -> None:
        out.write("\n t=%4.1fs  sent %d  echoed %d  longest gap %.0f ms\n" % (
            reactor.time() - start, stats["sent"], stats["received"], stats["gap"] * 1000))
        for line in client.link_table():
            out.write("   " + line + "\n")
        out.flush()

    def event(message: str, action: Callable[[], None]) -> None:
        out.write("\n>>> %s\n" % message)
        action()

    reactor.add_reader(app, on_reply)
    reactor.call_every(0.02, send)
    reactor.call_every(1.0, report)
    reactor.call_at(start + seconds * 0.3, event, "link 0 gets 40 ms of extra delay each way",
                    lambda: setattr(links[0], "delay_s", 0.04))
    reactor.call_at(start + seconds * 0.6, event, "link 1 dies (blackhole)",
                    lambda: setattr(links[1], "blackhole", True))
    reactor.call_at(start + seconds, reactor.stop)
    try:
        reactor.run()
    finally:
        client.close()
        server.close()
        for link in links:
            link.close()
        resolver.close()
        reactor.close()
    out.write("\ndemo done: %d sent, %d echoed back, longest gap %.0f ms\n" % (
        stats["sent"], stats["received"], stats["gap"] * 1000))
    return 0 if stats["received"] > 0 else 1


# ============================================================================
# Command line
# ============================================================================


def describe(config: Config) -> List[str]:
    """What a config means, for --check (never the keys themselves)."""
    cfg = config.section
    lines = ["mode: %s" % config.mode, "listen_addr: %s" % (cfg.listen_addr or ":%d" % cfg.listen_port)]
    if config.mode == "client":
        lines.append("client_id: %d" % cfg.client_id)
        for i, link in enumerate(cfg.links):
            numeric = numeric_address(link.host, link.port)
            via = describe_link_binding(link)
            lines.append("links[%d]: %s%s, priority %g%s" % (
                i, link.remote_addr, "" if numeric else " (host name, resolved at start)", link.priority,
                ", " + via if via else ""))
        lines.append("heartbeat every %gs, down after %d misses, switch when better by %g" % (
            cfg.heartbeat_interval_s, cfg.max_consecutive_fail, cfg.switch_threshold))
        families = [(numeric_address(link.host, link.port) or (None,))[0] for link in cfg.links]
        lines.append("MTU: application datagrams up to %d bytes cross a 1500-byte path unfragmented on these "
                     "links (mpudp adds %d); inside WireGuard, set MTU %d" % (
                         max_datagram_on(families), OVERHEAD, max_datagram_on(families) - 32))
        if cfg.redundancy == "auto":
            lines.append("redundancy: auto (a copy on the next best link while the active one loses heartbeats)")
        elif cfg.redundancy > 1:
            lines.append("redundancy: every packet on the %d best links (bandwidth x%d)" % (
                cfg.redundancy, cfg.redundancy))
    else:
        for i in range(len(cfg.client_public_keys)):
            lines.append("client %d: upstream %s" % (i, cfg.upstream_for(i)[0]))
        lines.append("heartbeat_timeout_sec: %g" % cfg.heartbeat_timeout_s)
    lines.append("session_timeout_sec: %g, max_sessions: %d" % (cfg.session_timeout_s, cfg.max_sessions))
    return lines


# What a reload cannot change: sockets and keys are set up once, at start.
RESTART_KEYS = {
    "client": ("listen_addr", "client_id", "private_key", "server_public_key", "log_target"),
    "server": ("listen_addr", "private_key", "client_public_keys", "log_target"),
}


def reload_config(running: Config, node: Any, log: Log) -> Config:
    """SIGHUP: read the config file again and apply what can change while running.

    An invalid file, or a change that needs a restart, is refused with a log
    line and the running config stays; the return value is the config now in force.
    """
    try:
        new = load_config(running.path)
    except ConfigError as exc:
        log.error("reload refused, the running config stays: %s" % str(exc).replace("\n", "; "))
        return running
    needs_restart = ["mode"] if new.mode != running.mode else [
        key for key in RESTART_KEYS[running.mode] if getattr(new.section, key) != getattr(running.section, key)]
    if needs_restart:
        log.error("reload refused, the running config stays: changing %s needs a restart" % ", ".join(
            "%s.%s" % (running.mode, key.replace("private_key", "%s_private_key" % running.mode))
            if key != "mode" else key for key in needs_restart))
        return running
    for warning in new.warnings:
        log.warn(warning)
    node.reconfigure(new.section)
    log.set_debug(new.section.debug)
    log.info("config reloaded from %s" % new.path)
    return new


def run(config: Config) -> int:
    """Run the client or server of `config` until SIGINT or SIGTERM; SIGHUP reloads, SIGUSR1 logs status."""
    cfg = config.section
    log = Log(debug=cfg.debug, target=cfg.log_target)
    reactor = Reactor(log=log)
    resolver = Resolver(reactor)
    node = Client(cfg, reactor, log, resolver) if config.mode == "client" else Server(cfg, reactor, log, resolver)
    running = [config]

    def on_hup() -> None:
        running[0] = reload_config(running[0], node, log)

    def on_usr1() -> None:
        for line in node.status_lines():
            log.info(line)

    # Before start-up, so no signal finds Python's default action; they are
    # handled once the loop runs.
    for signum in (signal.SIGINT, signal.SIGTERM):
        reactor.add_signal_handler(signum, reactor.stop)
    reactor.add_signal_handler(signal.SIGHUP, on_hup)
    reactor.add_signal_handler(signal.SIGUSR1, on_usr1)
    try:
        node.start()
    except OSError as exc:
        log.error("cannot start: %s" % (exc.strerror or exc))
        return 1
    log.info("mpudp %s running as %s (pid %d)" % (__version__, config.mode, os.getpid()))
    try:
        reactor.run()
    finally:
        log.info("stopping")
        node.close()
        resolver.close()
        reactor.close()
    return 0


def show_status(config: Config, out=None) -> int:
    """--status: print the running daemon's table from its score_file/status_file.

    0 if the daemon is running and the file is fresh, 3 if not (as LSB's status)."""
    out = out or sys.stdout
    cfg = config.section
    key = "score_file" if config.mode == "client" else "status_file"
    path = getattr(cfg, key)
    if not path:
        pid = find_daemon(config.path)
        if pid is None:
            out.write("mpudp is not running with %s\n" % config.path)
            return 3
        out.write("mpudp %s is running (pid %d); to see its %s, set %s.%s in %s and reload (SIGHUP)\n" % (
            config.mode, pid, "links" if config.mode == "client" else "clients", config.mode, key, config.path))
        return 0
    if not os.path.exists(path):
        out.write("mpudp is not running (or has not written %s yet)\n" % path)
        return 3
    try:
        status = read_json_file(path, "a status file", MAX_STATUS_BYTES)
        lines = client_status_lines(status) if config.mode == "client" else server_status_lines(status)
        written_at, pid = status["time"], status["pid"]
        if not (isinstance(written_at, (int, float)) and math.isfinite(written_at) and isinstance(pid, int)):
            raise TypeError
    except ConfigError as exc:
        out.write("cannot show the status: %s\n" % exc)
        return 3
    except (TypeError, KeyError, IndexError, ValueError, AttributeError, OverflowError, RecursionError):
        out.write("%s is not an mpudp %s status file\n" % (path, config.mode))
        return 3
    age = time.time() - written_at
    written_every_s = (max(SCORE_FILE_MIN_INTERVAL_S, cfg.heartbeat_interval_s) if config.mode == "client"
                       else SWEEP_INTERVAL_CEILING_S)
    if not _pid_alive(pid) or not -written_every_s <= age <= 3 * written_every_s:
        out.write("mpudp is not running: %s was last written %.0fs ago by pid %d\n" % (path, age, pid))
        return 3
    out.write("mpudp %s, pid %d, updated %.1fs ago\n" % (config.mode, pid, age))
    for line in lines:
        out.write(line + "\n")
    return 0


def find_daemon(config_path: str) -> Optional[int]:
    """The pid of an mpudp process running with this config file (Linux: from /proc), or None."""
    wanted = os.path.realpath(config_path)
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                args = f.read(65536).decode("utf-8", "replace").split("\0")
            cwd = os.readlink("/proc/%d/cwd" % pid)
        except OSError:
            continue
        if not any(arg.endswith("mpudp.py") or arg.endswith("/mpudp") for arg in args) or "--status" in args:
            continue
        given = [arg.split("=", 1)[1] for arg in args if arg.startswith(("-config=", "--config="))]
        given += [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-config", "--config")]
        if any(os.path.realpath(os.path.join(cwd, path)) == wanted for path in given or ["config.json"]):
            return pid
    return None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpudp.py", description="Multipath UDP relay: client and server in one file.")
    parser.add_argument("-config", "--config", default="config.json", metavar="PATH",
                        help="the JSON config file (default: config.json)")
    parser.add_argument("--check", action="store_true", help="check the config, say what it means, and exit")
    parser.add_argument("--status", action="store_true",
                        help="show the running daemon's links (client) or clients (server) and exit")
    parser.add_argument("--demo", action="store_true",
                        help="run a server, a client, two loopback links and an echo, and show a failover")
    parser.add_argument("--demo-seconds", type=float, default=12.0, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version="mpudp %s" % __version__)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.demo:
        return run_demo(args.demo_seconds)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            sys.stderr.write("mpudp: config error: %s\n" % line)
        return 2
    for warning in config.warnings:
        sys.stderr.write("mpudp: warning: %s\n" % warning)
    if args.status:
        return show_status(config)
    if args.check:
        for line in describe(config):
            print(line)
        print("config OK")
        return 0
    return run(config)


def run_as_import(argv: Sequence[str]) -> None:
    """Replace this process with `python3 -c "import mpudp; mpudp.main(argv)"`.

    Python compiles the script it is started with on every start and keeps
    the compiler's memory: about 6 MB of the daemon's resident memory.  An
    imported module loads from cached bytecode (__pycache__, written on the
    first import where the directory is writable, or by `python3 -m
    compileall` at install time) and costs none of it.  The process keeps its
    PID, so procd and systemd see no difference.
    """
    # The script's own path stays on the command line, so `pgrep -f .../mpudp.py` finds it.
    os.execv(sys.executable, [sys.executable, "-c", _IMPORT_AND_RUN, os.path.abspath(__file__)] + list(argv))


_IMPORT_AND_RUN = ("import os, sys; sys.path.insert(0, os.path.dirname(sys.argv[1])); import mpudp; "
                   "sys.exit(mpudp.main(sys.argv[2:]))")


if __name__ == "__main__":
    run_as_import(sys.argv[1:])
