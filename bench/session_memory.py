#!/usr/bin/env python3
"""Python heap bytes per idle session, client and server side, measured with tracemalloc.

    python3 bench/session_memory.py [--sessions 1000]

Builds a Client and a Server in this process (real sockets on loopback, nothing
sent), opens N sessions on each through the same code the data path uses, and
divides the growth of traced memory by N.  Kernel socket buffers are not
Python heap and are not counted (the server's cost per session also includes
one UDP socket, i.e. one file descriptor).
"""

import argparse
import os
import sys
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mpudp  # noqa: E402


def build(sessions):
    server_key, client_key = mpudp.generate_private_key(), mpudp.generate_private_key()
    log = mpudp.Log(stream=open(os.devnull, "w"))
    reactor = mpudp.Reactor(log=log)
    resolver = mpudp.Resolver(reactor)
    server = mpudp.Server(mpudp.parse_config({"mode": "server", "server": {
        "listen_addr": "127.0.0.1:0", "upstream_addr": "127.0.0.1:9",
        "server_private_key": mpudp.encode_key(server_key), "max_sessions": sessions,
        "client_public_keys": [mpudp.encode_key(mpudp.public_key(client_key))]}}).section,
        reactor, log, resolver)
    client = mpudp.Client(mpudp.parse_config({"mode": "client", "client": {
        "listen_addr": "127.0.0.1:0", "links": [{"remote_addr": "127.0.0.1:9"}], "max_sessions": sessions,
        "client_private_key": mpudp.encode_key(client_key),
        "server_public_key": mpudp.encode_key(mpudp.public_key(server_key))}}).section,
        reactor, log, resolver)
    return reactor, resolver, client, server


def measure(open_one, n):
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(n):
        open_one(i)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return growth / n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args(argv)
    n = args.sessions
    reactor, resolver, client, server = build(n)
    peer = server.peers[0]
    client_bytes = measure(lambda i: client.data._open_session(("127.0.0.1", 10000 + i)), n)
    server_bytes = measure(lambda i: server.data._open_session(peer, i + 1), n)
    assert len(client.sessions_by_id) == n and len(peer.sessions) == n
    print("sessions: %d (Python %s)" % (n, sys.version.split()[0]))
    print("client: %.0f bytes per idle session" % client_bytes)
    print("server: %.0f bytes per idle session (plus one UDP socket each)" % server_bytes)
    server.close()
    client.close()
    resolver.close()
    reactor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
