#!/usr/bin/env python3
"""Where a relay process's CPU goes at a fixed rate: py-spy or perf on the real processes.

    python3 bench/profile_processes.py                       # py-spy, mpudp, 1000 pps, 64 B, 20 s
    python3 bench/profile_processes.py --tool perf           # perf: kernel / libpython / other split
    python3 bench/profile_processes.py --path floor --size 1200 --seconds 10

Starts what bench.py starts for one path (the echo, the load generator, and
mpudp's client and server with two links, or the floor's two bare forwarders),
sends a paced stream through it, and meanwhile samples the client and the
server.  Prints each process's CPU per echoed packet (from /proc, as bench.py
measures it) and the top functions by own time and by inclusive time, as
shares of the samples and as us per echoed packet (share x CPU per packet).

py-spy is optional (``pip install py-spy``), perf too (linux-perf); neither is
needed by bench.py.  Loopback only; everything started is stopped at the end.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import harness
from params import FULL, HOST

TOP = 15
LINE_LOCATION = re.compile(r" \((?:[^()]*/)?([^/()]+)\)$")  # "f (/a/b/mpudp.py:12)" -> "f (mpudp.py:12)"
FRAME_LOCATION = re.compile(r" \((?:[^()]*/)?([^/():]+)(?::\d+)?\)$")  # "f (/a/b/mpudp.py:12)" -> "f (mpudp.py)"


def start(bench, path):
    """The echo, the load generator and the pair of `path`; {"client": Child, "server": Child, "addr"}."""
    bench.echo = bench.helper("echo")
    bench.echo_addr = [HOST, bench.echo.ready["port"]]
    bench.loadgen = bench.helper("loadgen")
    pair = bench.floor() if path == "floor" else bench.relay("", {})
    bench.wait_forwarding(pair["addr"], path)
    time.sleep(1.0)
    return pair


def sampler(tool, pid, seconds, out):
    """The command that samples process `pid` for `seconds` into `out`."""
    if tool == "py-spy":
        return ["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "1000",
                "--format", "raw", "--nonblocking", "--output", out]
    return ["perf", "record", "-F", "1000", "-p", str(pid), "-o", out, "--", "sleep", str(seconds)]


def collapsed_top(path):
    """(samples, own, inclusive, lines) from py-spy's raw output: one "frame;frame;... count" a
    line; own counts the innermost frame, inclusive each distinct frame of a stack once, lines
    the innermost frame's line (a C call such as sendto is charged to the line calling it)."""
    own, inclusive, lines = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            located = [frame for frame in stack.split(";") if not frame.startswith(("process ", "thread "))]
            frames = [FRAME_LOCATION.sub(r" (\1)", frame) for frame in located]
            total += n
            if frames:
                own[frames[-1]] += n
                lines[LINE_LOCATION.sub(r" (\1)", located[-1])] += n
            for frame in set(frames):
                inclusive[frame] += n
    return total, own, inclusive, lines


def perf_split(path):
    """perf report's share of samples by shared object (kernel, libpython, libc, ...)."""
    report = lambda sort: subprocess.run(["perf", "report", "-i", path, "-g", "none", "--sort", sort, "--stdio"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         universal_newlines=True).stdout
    out, symbols = report("dso"), report("dso,sym")
    keep = lambda text, n: [line for line in text.splitlines() if line.strip() and not line.startswith("#")
                            and "%" in line.split()[0]][:n]
    return keep(out, 8), keep(symbols, 25)


def report(tool, who, out, us_per_pkt):
    print("\n== %s: %.1f us CPU per echoed packet ==" % (who, us_per_pkt))
    if tool == "perf":
        dsos, symbols = perf_split(out)
        print("by shared object (share of samples; us per echoed packet):")
        for line in dsos:
            share = float(line.split()[0].rstrip("%"))
            print("  %6.1f us  %s" % (us_per_pkt * share / 100, line.strip()))
        print("top symbols:")
        print("\n".join("  " + line.strip() for line in symbols))
        return
    total, own, inclusive, lines = collapsed_top(out)
    if not total:
        print("  no samples")
        return
    for title, counter in (("own time", own), ("inclusive time", inclusive), ("own time, by line", lines)):
        print("top functions by %s (%d samples; share, us per echoed packet):" % (title, total))
        for frame, n in counter.most_common(TOP):
            print("  %5.1f%%  %6.1f us  %s" % (100.0 * n / total, us_per_pkt * n / total, frame))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=("py-spy", "perf"), default="py-spy")
    parser.add_argument("--path", choices=("relay", "floor"), default="relay", help="mpudp or the bare forwarders")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs mpudp.py")
    args = parser.parse_args(argv)
    if not shutil.which(args.tool):
        sys.stderr.write("%s is not installed\n" % args.tool)
        return 2
    workdir = tempfile.mkdtemp(prefix="mpudp-profile-")
    bench = harness.Bench(dict(FULL, window=1), args.python, workdir)
    try:
        pair = start(bench, args.path)
        pids = {who: pair[who].pid for who in ("client", "server")}
        bench.loadgen.send({"cmd": "rate", "target": pair["addr"], "size": args.size, "rate": args.rate,
                            "duration": args.seconds + 1.0, "warmup": 0.5, "phase": bench.next_phase(),
                            "pids": pids})
        time.sleep(0.5)
        outs = {who: os.path.join(workdir, "%s.%s" % (who, "txt" if args.tool == "py-spy" else "data"))
                for who in pids}
        samplers = [subprocess.Popen(sampler(args.tool, pid, args.seconds, outs[who]), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL) for who, pid in pids.items()]
        result = bench.loadgen.recv(args.seconds + 30)
        for proc in samplers:
            proc.wait(60)
        print("%s at %d pps, %d B, %d s: %d echoed, loss %s (sampled by %s; CPU per packet is "
              "for the whole window, sampling included)" % (args.path, args.rate, args.size, args.seconds,
                                                           result["received"], result["loss"], args.tool))
        for who in pids:
            us = result["cpu"][who]["s"] / max(1, result["received"]) * 1e6
            report(args.tool, who, outs[who], us)
    finally:
        bench.kids.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
