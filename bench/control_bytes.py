#!/usr/bin/env python3
"""What the control traffic costs per link: heartbeats, echoes and path-MTU probes.

    python3 bench/control_bytes.py [--seconds 60] [--interval 0.5]

A Server and a Client (two links to it, straight over loopback, no data: the pair of
profile_hot_path.build) run on one Reactor for `--seconds`; the client's per-link
counts of bytes sent and received (every authenticated packet, so heartbeats,
echoes, probes and their answers, and the handshake) are divided by the time, and
what it sent is split by packet type.  On loopback the path-MTU search ends at
its first probe (the interface's MTU, 65535, passes), as it does on any path that
carries its interface's MTU; a 1500-byte path costs one 1500-byte probe and its
answer, and again every PMTU_RAISE_S (600 s).  IP and UDP headers (28 bytes over
IPv4) are added per packet for the "on the wire" figure.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mpudp  # noqa: E402
from profile_hot_path import build  # noqa: E402  (the same in-process pair, with an echo upstream)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    sent_by_kind = {}  # (link, packet type) -> [packets, bytes]: the control packets the client sends
    send = mpudp.ClientLink.send

    def counting_send(link, packet, counters, unfragmented=False):
        tally = sent_by_kind.setdefault((link.index, packet[0] & mpudp.TYPE_MASK), [0, 0])
        tally[0] += 1
        tally[1] += len(packet)
        return send(link, packet, counters, unfragmented)

    mpudp.ClientLink.send = counting_send
    started = time.monotonic()
    reactor, client = build(links=2, heartbeat_interval_sec=args.interval)
    while time.monotonic() < started + args.seconds:
        reactor.run_once(0.05)
    args.seconds = time.monotonic() - started
    print("heartbeat_interval_sec %.2f, %.0f s, Python %s" % (args.interval, args.seconds, sys.version.split()[0]))
    for link in client.links:
        sent_wire = link.tx_bytes + 28 * link.tx_packets
        received_wire = link.rx_bytes + 28 * link.rx_packets
        print("link %d: sent %d packets, %.1f B/s (%.1f B/s on the wire); received %d packets, %.1f B/s "
              "(%.1f B/s on the wire); path MTU %s" % (
                  link.index, link.tx_packets, link.tx_bytes / args.seconds, sent_wire / args.seconds,
                  link.rx_packets, link.rx_bytes / args.seconds, received_wire / args.seconds,
                  link.pmtu.confirmed + mpudp.ip_udp_headers(link.endpoint.family)))
        for kind, name in ((mpudp.TYPE_HEARTBEAT, "heartbeats"), (mpudp.TYPE_PROBE, "path-MTU probes"),
                           (mpudp.TYPE_HELLO, "HELLOs")):
            packets, size = sent_by_kind.get((link.index, kind), (0, 0))
            print("  %s: %d sent, %d bytes, %.1f B/s (%.1f B/s with IPv4/UDP headers)" % (
                name, packets, size, size / args.seconds, (size + 28 * packets) / args.seconds))
    client.close()
    reactor.close()


if __name__ == "__main__":
    main()
