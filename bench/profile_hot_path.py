#!/usr/bin/env python3
"""Where the time per packet goes: a cProfile of the data path, in one process.

    python3 bench/profile_hot_path.py [--size 1200] [--packets 20000] [--profile]
    python3 bench/profile_hot_path.py --rate 1000 --packets 10000 --profile   # paced, one at a time
    python3 bench/profile_hot_path.py --rate 1000 --packets 2000 --opcodes    # bytecodes per function
    python3 bench/profile_hot_path.py --rate 100 --packets 1000 --links 2 --aggregate --opcodes

Runs a Server, a Client (one loopback link, or --links N, aggregating with
--aggregate), an echo upstream and an application socket on one Reactor,
keeps a window of 32 datagrams in flight
(or, with --rate, sends one datagram every 1/rate s, as bench.py's 1000 pps
stream does) and reports the process's CPU time per echoed packet (all four
parties, so it is an upper bound for the relay's share); --profile prints the
top functions by own time, with calls and microseconds per echoed packet
(cProfile's own overhead included: compare functions, not totals); --opcodes
counts the bytecode instructions each function of mpudp.py and selectors.py
runs per echoed packet (exact and repeatable, unlike times: a measure of how
much Python work a change removes, not of what that saves).
bench/bench.py measures the relay as separate processes;
bench/profile_processes.py samples those with py-spy or perf.
"""

import argparse
import collections
import cProfile
import os
import pstats
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mpudp  # noqa: E402

WINDOW = 32


def build(links=1, **client_settings):
    """A Server, a Client with `links` links to it (and `client_settings`) and an echo
    upstream on one Reactor, returned once the handshake is done: (reactor, client)."""
    log = mpudp.Log(stream=open(os.devnull, "w"))
    reactor = mpudp.Reactor(log=log)
    resolver = mpudp.Resolver(reactor)
    echo = mpudp.open_udp_socket(socket.AF_INET, ("127.0.0.1", 0))

    def on_echo():
        while True:
            try:
                data, addr = echo.recvfrom(65536)
            except BlockingIOError:
                return
            echo.sendto(data, addr)

    reactor.add_reader(echo, on_echo)
    server_key, client_key = mpudp.generate_private_key(), mpudp.generate_private_key()
    server = mpudp.Server(mpudp.parse_config({"mode": "server", "server": {
        "listen_addr": "127.0.0.1:0", "upstream_addr": "127.0.0.1:%d" % echo.getsockname()[1],
        "server_private_key": mpudp.encode_key(server_key),
        "client_public_keys": [mpudp.encode_key(mpudp.public_key(client_key))]}}).section, reactor, log, resolver)
    server.start()
    client_section = dict(client_settings, **{
        "listen_addr": "127.0.0.1:0",
        "links": [{"remote_addr": "127.0.0.1:%d" % server.listen_sock.getsockname()[1]}] * links,
        "client_private_key": mpudp.encode_key(client_key),
        "server_public_key": mpudp.encode_key(mpudp.public_key(server_key))})
    client = mpudp.Client(mpudp.parse_config({"mode": "client", "client": client_section}).section, reactor, log,
                          resolver)
    client.start()
    deadline = time.monotonic() + 10
    while (client.epoch is None or server.peers[0].return_path.addr is None) and time.monotonic() < deadline:
        reactor.run_once(0.05)
    return reactor, client


def pump(reactor, client, payload, packets):
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("127.0.0.1", 0))
    app.setblocking(False)
    destination = client.listen_sock.getsockname()
    sent = echoed = 0
    deadline = time.monotonic() + 60
    while echoed < packets and time.monotonic() < deadline:
        while sent - echoed < WINDOW and sent < packets:
            app.sendto(payload, destination)
            sent += 1
        reactor.run_once(0.01)
        while True:
            try:
                app.recv(65536)
            except BlockingIOError:
                break
            echoed += 1
        if sent == packets and sent - echoed > WINDOW:  # lost some: do not wait for them
            break
    return echoed


def pace(reactor, client, payload, packets, rate):
    """Send `packets` datagrams, one every 1/rate s, through the client; the reactor runs
    between sends (the application socket is one of its readers).  Returns the echoes."""
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("127.0.0.1", 0))
    app.setblocking(False)
    destination = client.listen_sock.getsockname()
    echoed = [0]

    def on_app():
        while True:
            try:
                app.recv(65536)
            except BlockingIOError:
                return
            echoed[0] += 1

    reactor.add_reader(app, on_app)
    interval = 1.0 / rate
    next_send = time.monotonic()
    deadline = next_send + packets * interval + 5
    sent = 0
    while time.monotonic() < deadline and echoed[0] < packets:
        now = time.monotonic()
        if sent < packets and now >= next_send:
            app.sendto(payload, destination)
            sent += 1
            next_send += interval
        reactor.run_once(max(0.0, min(next_send - time.monotonic(), 0.05)))
    return echoed[0]


class OpcodeCounter(object):
    """sys.settrace with opcode events, counting per (file, function) in mpudp.py and selectors.py."""

    FILES = ("mpudp.py", "selectors.py")

    def __init__(self):
        self.counts = collections.Counter()

    def trace(self, frame, event, _arg):
        filename = frame.f_code.co_filename
        if not filename.endswith(self.FILES):
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.counts[(os.path.basename(filename), frame.f_code.co_name)] += 1
        return self.trace

    def print_per_packet(self, echoed, top=25):
        print("%.0f bytecodes per echoed packet in mpudp.py and selectors.py" % (
            sum(self.counts.values()) / echoed))
        for (filename, name), n in self.counts.most_common(top):
            print("%9.1f  %s (%s)" % (n / echoed, name, filename))


def print_per_packet(profiler, echoed, top=25):
    """cProfile's top functions by own time, as calls and us per echoed packet."""
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    print("calls/pkt  own us/pkt  cum us/pkt  function")
    for (filename, line, name), (_cc, calls, own, cum, _callers) in rows:
        print("%9.2f  %10.2f  %10.2f  %s (%s:%d)" % (calls / echoed, own / echoed * 1e6, cum / echoed * 1e6, name,
                                                    os.path.basename(filename), line))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1200)
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--rate", type=float, help="paced: datagrams per second, one at a time")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--opcodes", action="store_true", help="count bytecodes per function (slow)")
    parser.add_argument("--links", type=int, default=1, help="links from the client to the server (loopback)")
    parser.add_argument("--aggregate", action="store_true", help="the client aggregates its links")
    args = parser.parse_args(argv)
    reactor, client = build(args.links, **({"aggregate": True} if args.aggregate else {}))
    counter = OpcodeCounter() if args.opcodes else None
    # CPU time, not wall time: at a fixed rate the process mostly sleeps in epoll, and a
    # wall-clock profile would charge that sleep to poll().
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    if counter:
        sys.settrace(counter.trace)
    if args.rate:
        echoed = pace(reactor, client, b"x" * args.size, args.packets, args.rate)
    else:
        echoed = pump(reactor, client, b"x" * args.size, args.packets)
    sys.settrace(None)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print("%d-byte payloads: %d echoed in %.2fs, %.0f pps, %.1f us CPU per echoed packet "
          "(client+server+echo+app, Python %s)" % (args.size, echoed, wall, echoed / wall,
                                                  cpu / max(echoed, 1) * 1e6, sys.version.split()[0]))
    if profiler:
        print_per_packet(profiler, max(echoed, 1))
    if counter:
        counter.print_per_packet(max(echoed, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
