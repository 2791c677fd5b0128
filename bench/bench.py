#!/usr/bin/env python3
"""End-to-end benchmark of mpudp: separate processes on loopback, the direct path beside it.

    python3 bench/bench.py                 # about 3 minutes; prints a table
    python3 bench/bench.py --json          # the same run, JSON on stdout
    python3 bench/bench.py --quick --json  # a smoke run of a few seconds (tests/test_bench_smoke.py)
    python3 bench/bench.py --save PATH     # also write the JSON to PATH
    python3 bench/bench.py --show PATH     # print the table of a saved JSON result
    python3 bench/bench.py --go DIR        # also the Go original, DIR holding its mpudp and keygen

Standard library only, Python 3.7+, Linux (/proc), loopback only (127.0.0.1).
Progress goes to stderr; stdout holds only the table or the JSON.

The code: this file is the entry point (options, the work directory, --role
dispatch); params.py the fixed parameters; roles.py the helper processes (echo,
load generator, bare forwarder, link emulators); procfs.py the /proc readings;
harness.py the children, the relays' configs and the order of the windows;
summary.py the figures and targets; report.py the table.

What runs
---------
Every party is its own process, so none shares a GIL with another::

    load generator --UDP--> mpudp client ==link 0==> mpudp server --UDP--> echo
        (one socket)                      ==link 1==>
    load generator --UDP--> echo                                     (the direct path)

- *echo*: this file with ``--role echo``: a loop of recvfrom_into/sendto on one
  socket, select() only when the socket is empty.
- *mpudp server* and *mpudp client*: ``python3 mpudp.py -config=PATH``, with the
  "default config" of the failover issue: heartbeat_interval_sec 0.5,
  max_consecutive_fail 5, two links, and a score_file / status_file (for the
  counters).  For the throughput, latency, CPU and
  memory figures both links go straight to the server (two client sockets, no
  extra hop); for failover and restart they go through *link emulators*
  (``--role links``: tests/linkemu.py LinkEmulators in a process of their own,
  steered over stdin) so a link can be blackholed.
- *bare forwarders* (the floor): two processes of this file with ``--role
  forward`` in the client's and the server's places (generator -> forwarder ->
  forwarder -> echo and back).  Each is the loop shape of an mpudp process
  (selectors, each socket drained until EAGAIN, recvfrom_into/send) with none of
  its protocol: no header, MAC, replay window, sessions or timers.
- *Go original* (with ``--go DIR``): its ``mpudp`` binary as client and server,
  built from its source outside this repository (DIR holds ``mpudp`` and
  ``keygen``, or their paths are given), configured like mpudp's pair: two
  links to the server, heartbeat_interval_sec 0.5, max_consecutive_fail 5,
  ed25519 keys from its ``keygen``.  Its client answers only the first local
  address it saw, so the load generator sends every phase from one socket.
- *load generator*: ``--role loadgen``: one UDP socket that sends and receives,
  steered by JSON commands on stdin.  Each datagram carries a phase id, a
  sequence number and its send time (time.monotonic_ns), so latency comes from
  the echo itself and stragglers of an earlier phase are ignored.  An echo of
  a sequence number already echoed is counted as a duplicate, not delivered.
- the orchestrator (this process) spawns everything, each child in its own
  session (process group) with PR_SET_PDEATHSIG, and kills every group in a
  ``finally``, so nothing outlives the run even on error or Ctrl-C.

How each figure is measured
---------------------------
Each figure is measured 3 times (start-up 5 times; everything once with
--quick) and shown as the median with its spread [min-max].  Within one
repetition the direct and the relay measurement of a figure run back to back
(in alternating order), and ratios and differences are taken per repetition
before the median.

- *Delivered packets/s, Mbit/s (saturation)*: the generator keeps a window of
  WINDOW (128) datagrams outstanding: it sends whenever fewer are in flight and
  counts echoes.  In flight = sent - highest sequence number echoed (the path
  keeps order), so a lost datagram frees its slot when a later one returns; a
  silence of 100 ms frees them all.  After WARMUP seconds it counts echoes for
  DURATION seconds: pps = echoes / seconds; Mbit/s = pps * payload bytes * 8
  (payload only, no IP/UDP/relay headers, one direction).  The machine has 2
  cores: on the relay path the generator, client, server and echo share them,
  on the direct path the generator and echo do.  The CPU share each process
  got is reported, so whoever is the bottleneck is visible.
- *Fixed rate (1000 pps)*: open loop: datagram i is sent at start + i/rate,
  whatever comes back; delivered pps counts echoes in the window, loss counts
  the datagrams sent in the window whose echo never came.
- *Round-trip latency*: receive time minus the send time in the payload, for
  every echo of the 1000 pps phases; p50 and p99 by nearest rank.  "Added
  RTT" = relay p50 - direct p50 of the same repetition (the generator's and
  echo's own costs cancel out).
- *CPU per packet*: CPU time of each process over the measured window divided
  by the echoes counted in it.  CPU time is se.sum_exec_runtime from
  /proc/PID/task/*/sched (microsecond resolution) when the kernel has it,
  else utime+stime from /proc/PID/stat (10 ms ticks); both are in the JSON.
  "s per Mpkt" and "us per packet" are the same number; relay CPU/packet =
  (client + server CPU) / echoed packets.  It includes heartbeats and
  timers, i.e. what the relay really costs.
- *RSS*: VmRSS from /proc/PID/status.  Idle: once the relay has forwarded its
  first packet and sat idle for a second.  Under load: the largest VmRSS read
  at the end of a saturation window.  VmHWM (peak) at the end is in the JSON.
- *Start-up to forwarding*: the generator sends one datagram a millisecond
  to a free port; then a fresh server and a fresh client are spawned at once
  (server first) on that port; the figure is first echo - spawn time.  For
  reference, the JSON has the time of ``python3 -c pass`` and of
  ``python3 mpudp.py --version`` (the interpreter's and the import's share).
- *Failover gap*: 100 pps through the emulated links; after 1 s the
  link carrying the data (the one whose emulator counts the most datagrams)
  is blackholed both ways; the figure is the longest time between two
  consecutive echoes.  Between repetitions the link comes back and is given
  time to become steady again.
- *Server restart*: 100 pps; after 1 s the server gets SIGTERM, and once it has
  exited a new server is spawned on the same port; "resume" is the first echo
  - the new server's spawn time, "outage" is the first echo after - the last
  echo before.
- *Floor*: the bare forwarders at 1000 pps, both sizes, measured like the
  relay in every repetition (CPU of the two forwarders per echoed packet, added
  RTT p50 against the direct path of the same repetition).  What any CPython
  relay of this shape pays on this machine for its process wake-ups, and
  "mpudp - floor" is what mpudp's protocol and bookkeeping add to that, per
  repetition.
- *Side by side* (the first table): the floor, the Go original (with --go) and
  mpudp have windows of every figure in every repetition, back to back with
  the direct path: saturation (both sizes), 1000 pps (both sizes).  Relay CPU
  per echoed packet is client + server (all threads) per echo; added RTT p50 is
  the path's p50 - the direct path's p50 of the same repetition.  mpudp/Go and
  mpudp/floor are taken per repetition, then their median; idle RSS is one
  reading of each process after the idle second (children run without
  PYTHONDONTWRITEBYTECODE, mpudp.py's bytecode cached, as a user runs it).
- *Redundancy 2*: a second relay (server + client) runs beside the first one,
  its client with ``"redundancy": 2`` (both loopback links carry every packet,
  the server answers on both).  At 1200 B only, in each repetition right after
  (or before) the first relay, it gets a saturation window of 1.5 s and a
  1000 pps window of 2 s (shorter than the others, to keep the run short; every
  figure is a rate or a median, so the length does not bias it).
  It is reported against the first relay (redundancy 1) of the same
  repetition: pkt/s, relay CPU/packet, added RTT p50 (- the direct path's p50),
  each as r2/r1 too.  Echoes delivered twice to the generator must be 0; the
  "duplicate" counters of both relays' server and client (copies dropped by the
  replay window) come from their status_file / score_file, read once the files
  are newer than the last measurement.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time

from params import FULL, QUICK, WINDOW


def parse_args(argv):
    parser = argparse.ArgumentParser(description="End-to-end benchmark of mpudp (see the module docstring).")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (figures not comparable)")
    parser.add_argument("--save", metavar="PATH", help="also write the JSON result to PATH")
    parser.add_argument("--show", metavar="PATH", help="print the table of a saved JSON result and exit")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs mpudp.py")
    parser.add_argument("--window", type=int, default=WINDOW, help="datagrams in flight at saturation (%(default)s)")
    parser.add_argument("--go", metavar="PATH",
                        help="also measure the Go original: a directory with its mpudp and keygen binaries "
                             "(built from its source), or the path of its mpudp binary")
    parser.add_argument("--go-keygen", metavar="PATH", help="the Go original's keygen, if not beside --go")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args):
    """One measurement in a temporary work directory; the JSON result, or None on failure."""
    import harness
    import summary

    params = dict(QUICK if args.quick else FULL, window=args.window)
    workdir = tempfile.mkdtemp(prefix="mpudp-bench-")
    bench = None
    started = time.monotonic()
    try:
        go = harness.GoOriginal(args.go, args.go_keygen) if args.go else None
        bench = harness.Bench(params, args.python, workdir, go)
        raw = bench.run()
    except harness.BenchError as exc:
        sys.stderr.write("bench: %s\n" % exc)
        for k in bench.kids.all if bench is not None else ():
            if not k.name.startswith(("echo", "loadgen", "links")):
                sys.stderr.write("--- %s (pid %d, exit %r) log tail:\n%s" % (k.name, k.pid, k.proc.poll(), k.tail()))
        return None
    finally:
        if bench is not None:
            bench.kids.close()
        if args.keep:
            sys.stderr.write("bench: work directory kept: %s\n" % workdir)
        else:
            for name in os.listdir(workdir):
                os.unlink(os.path.join(workdir, name))
            os.rmdir(workdir)
    result = summary.summarize_run(raw)
    result["quick"] = args.quick
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["targets"] = summary.judge(result)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.role:
        import roles
        return roles.ROLES[args.role](args.role_args)
    import report
    if args.show:
        with open(args.show) as f:
            print(report.render(json.load(f)))
        return 0

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    result = run(args)
    if result is None:
        return 1
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")
    print(text if args.json else report.render(result))
    import harness
    harness.progress("done in %.1f s" % result["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
