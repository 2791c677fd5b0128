"""The benchmark's fixed parameters: sizes, rates, window lengths and the relays' settings.

Every other module of bench/ reads these; none of them changes them.
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MPUDP = os.path.join(ROOT, "mpudp.py")
BENCH = os.path.join(HERE, "bench.py")
TESTS = os.path.join(ROOT, "tests")
HOST = "127.0.0.1"

SIZES = (64, 1200)
RATE = 1000
# Datagrams in flight at saturation: deep enough that every stage of the relay path has a
# batch to work on, shallow enough to fit a socket buffer under Linux's default rmem_max
# (128 x ~2.3 KB of 1200-byte datagrams < 416 KB), so nothing is dropped.
WINDOW = 128
LOSS_TIMEOUT_S = 0.1
FAILOVER_RATE = 100
RELAY_CONFIG = {"heartbeat_interval_sec": 0.5, "max_consecutive_fail": 5}
REDUNDANCY = 2  # the second relay's client config "redundancy"
REDUNDANT_SIZE = 1200
STATUS_WAIT_S = 8.0  # a server writes its status_file every 5 s (its sweep), a client every 1 s

# The Go original's settings: the seed's defaults where mpudp has the same key (RELAY_CONFIG),
# and what its code needs spelled out (it has no defaults: a max_packet_size of 0 drops every
# datagram, a heartbeat_timeout_sec of 0 forgets the client every second).
GO_SERVER_CONFIG = {"heartbeat_timeout_sec": 10, "max_packet_size": 65535}
GO_CLIENT_CONFIG = dict(RELAY_CONFIG, client_id=0, max_packet_size=65535, loss_weight=5.0, rtt_weight=1.0,
                        switch_threshold=25.0, throughput_threshold_kbps=500, dns_refresh_interval_sec=0)

FULL = {"reps": 3, "warmup": 0.3, "sat_s": 2.5, "rate_s": 3.0, "failover_reps": 3, "restart_reps": 3,
        "startup_reps": 5, "idle_s": 1.0, "redundant_sat_s": 1.5, "redundant_rate_s": 2.0}
QUICK = {"reps": 1, "warmup": 0.1, "sat_s": 0.5, "rate_s": 0.5, "failover_reps": 1, "restart_reps": 1,
         "startup_reps": 1, "idle_s": 0.2, "redundant_sat_s": 0.5, "redundant_rate_s": 0.5}

# The relays measured side by side in the steady-state windows, in the order of a repetition
# (odd repetitions run it backwards).  "relay" is mpudp; "go" only runs with --go.
PATHS = ("direct", "floor", "go", "relay", "redundant")
