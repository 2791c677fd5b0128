"""Hostile network, floods and limits: a legitimate stream keeps flowing while ten times
its rate of garbage, replays and wrong-key packets hits the server, whose memory does not
grow; a full socket buffer is survived; max_sessions refuses the next session on either
side.  Real processes on loopback; figures are printed (`pytest -s` shows them).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import mpudp
from helpers import (
    FUZZ_SEED, LOOPBACK, WAIT_S, App, alive, captured, drain, duplicates, header, random_bytes, reporter, udp_socket,
)

DATA, HEARTBEAT, HELLO = mpudp.TYPE_DATA, mpudp.TYPE_HEARTBEAT, mpudp.TYPE_HELLO

report = reporter("hostile")


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def udp_drops(port):
    """The kernel's drop count (/proc/net/udp*) of the sockets bound to local `port`."""
    total = 0
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[-1])
    return total


# ============================================================================
# Flood
# ============================================================================


FLOODER = r"""
import binascii, json, socket, sys, time
path, host, port, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
packets = [binascii.unhexlify(line.strip()) for line in open(path) if line.strip()]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setblocking(False)
sent = received = errors = 0


def drain():
    # What came back since the last call (the test reports it).
    count = 0
    try:
        while True:
            s.recv(65536)
            count += 1
    except OSError:
        return count


start = time.monotonic()
print("started", flush=True)
while True:
    elapsed = time.monotonic() - start
    if elapsed >= seconds:
        break
    for _ in range(max(0, min(int(elapsed * rate) - sent, 500))):
        try:
            s.sendto(packets[sent % len(packets)], (host, port))
        except OSError:
            errors += 1
        sent += 1
    received += drain()
    time.sleep(0.002)
time.sleep(0.2)
received += drain()
print(json.dumps({"sent": sent, "received": received, "errors": errors, "seconds": time.monotonic() - start}))
"""


def flood_packets(pair, rng, n=400):
    """Garbage, captured replays, and packets under a wrong key that reach the MAC check."""
    c2s = [data for data, _s, _t in captured(pair.taps, "up", (DATA, HEARTBEAT))]
    hellos = [data for data, _s, _t in captured(pair.taps, "up", (HELLO,))]
    tag = header(c2s[-1])[4] >> mpudp.SEQ_BITS
    wrong = mpudp.make_mac(random_bytes(rng, 32))
    packets = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.25:
            packets.append(rng.choice(c2s))
        elif roll < 0.5:
            nonce = (tag << mpudp.SEQ_BITS) | rng.randrange(1 << 30, 1 << 47)
            packets.append(mpudp.seal(wrong, rng.choice((DATA, HEARTBEAT)) | mpudp.FLAG_ACTIVE, 0, 0,
                                      rng.getrandbits(32), nonce, random_bytes(rng, rng.randrange(8, 1200))))
        elif roll < 0.7:
            packets.append(random_bytes(rng, rng.randrange(1, 1400)))
        elif roll < 0.8:
            packets.append(rng.choice(hellos))
        elif roll < 0.9:
            client_nonce = random_bytes(rng, 16)
            packets.append(mpudp.seal(wrong, HELLO, 0, 0, 0, mpudp.handshake_nonce(mpudp.epoch_tag(client_nonce)),
                                      mpudp.HELLO_PAYLOAD.pack(client_nonce, bytes(16))))
        else:
            packets.append(mpudp.seal(wrong, DATA, 0, rng.choice((1, 2, 0xFFFF)), 1,
                                      rng.getrandbits(64), random_bytes(rng, 100)))
    return packets


@pytest.mark.slow
def test_flood_does_not_starve_legitimate_traffic(tapped_pair, tmp_path):
    legit_pps, flood_factor, flood_s = 200, 10, 3.0
    pair = tapped_pair()
    app = App(pair.client_address)
    for _ in range(5):
        app.probe("warm-up")
    for tap in pair.taps:
        assert tap.wait_for(lambda t: t.count("up", HEARTBEAT) >= 3)
    packets = flood_packets(pair, random.Random(FUZZ_SEED))
    packet_file = os.path.join(str(tmp_path), "flood.hex")
    with open(packet_file, "w") as f:
        f.write("\n".join(p.hex() for p in packets))
    pid = pair.server.proc.pid

    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, packet_file, LOOPBACK, str(pair.server_port),
         str(legit_pps * flood_factor), str(flood_s)], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert flooder.stdout.readline().strip() == "started"
        rss_start = rss_kb(pid)
        # The legitimate stream: legit_pps unique payloads for as long as the flood lasts.
        sock = app.sock
        sock.setblocking(False)
        sent, received = set(), set()
        start = time.monotonic()
        while time.monotonic() - start < flood_s - 0.2:
            due = int((time.monotonic() - start) * legit_pps)
            while len(sent) < due:
                payload = b"legit:%d" % len(sent)
                sock.sendto(payload, pair.client_address)
                sent.add(payload)
            received.update(data for data, _ in drain(sock))
            time.sleep(0.002)
        tail = time.monotonic() + 1.0
        while time.monotonic() < tail and not sent <= received:
            received.update(data for data, _ in drain(sock))
            time.sleep(0.01)
        out, _ = flooder.communicate(timeout=WAIT_S)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    rss_end = rss_kb(pid)
    flood = json.loads(out.strip().splitlines()[-1])
    fraction = len(received & sent) / float(len(sent))
    report("flood: %d hostile packets at %.0f pps against %d legitimate at %d pps: %.1f%% of the legitimate "
           "echoed back; server RSS %d -> %d kB (%+d kB); flooder got %d answers"
           % (flood["sent"], flood["sent"] / flood["seconds"], len(sent), legit_pps, 100 * fraction,
              rss_start, rss_end, rss_end - rss_start, flood["received"]))
    assert flood["sent"] >= legit_pps * flood_factor * flood_s * 0.8, "the flooder fell behind: %s" % flood
    assert fraction >= 0.9
    assert rss_end - rss_start < 5 * 1024
    assert flood["received"] == 0, "the server answered the flood"
    assert duplicates(pair.echo.payloads()) == []
    assert alive(pair.server) and alive(pair.client)
    app.sock.setblocking(True)
    app.probe("after-flood")


# ============================================================================
# Full buffers and limits
# ============================================================================


def test_full_socket_buffer_is_survived(relay_pair):
    pair = relay_pair(links=1)
    app = App(pair.client_address)
    app.probe("before")
    drops_before = udp_drops(pair.client_port)
    blaster = udp_socket(blocking=False)
    payload = b"x" * 1200
    blasted = refused = 0
    pid = pair.client.proc.pid
    os.kill(pid, signal.SIGSTOP)  # the client cannot forward at all: its listen buffer fills
    try:
        for _ in range(4000):
            try:
                blaster.sendto(payload, pair.client_address)
                blasted += 1
            except BlockingIOError:
                refused += 1
    finally:
        os.kill(pid, signal.SIGCONT)
    for _ in range(4000):  # and faster than it can forward while it runs
        try:
            blaster.sendto(payload, pair.client_address)
            blasted += 1
        except BlockingIOError:
            refused += 1
    drops = udp_drops(pair.client_port) - drops_before
    recovered = app.probe("after", timeout=WAIT_S)
    report("full socket buffer: %d datagrams blasted at the client (%d EAGAIN at the sender), %d dropped "
           "by the kernel at its listen socket; traffic works again %.0f ms later"
           % (blasted, refused, drops, recovered * 1000))
    assert drops > 0
    assert alive(pair.client) and alive(pair.server)
    blaster.close()
    app.close()


@pytest.mark.parametrize("side, limit", [("client", 3), ("server", 2)])
def test_max_sessions_refuses_the_next_one(relay_pair, side, limit):
    pair = relay_pair(links=1, **{side: {"max_sessions": limit}})
    refusing = getattr(pair, side)
    apps = [App(pair.client_address) for _ in range(limit + 1)]
    for i, app in enumerate(apps[:limit]):
        app.probe("app%d" % i)
    assert apps[limit].silent_for("app%d" % limit, 1.0) == []
    refusing.wait_for_line("max_sessions (%d) reached" % limit)
    for i, app in enumerate(apps[:limit]):
        app.probe("app%d-again" % i)
    assert not any(data.startswith(b"app%d" % limit) for data in pair.echo.payloads())
    assert alive(refusing)
    for app in apps:
        app.close()
