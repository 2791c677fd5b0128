#!/usr/bin/env python3
"""Several mpudp.py files side by side at a fixed rate: which change moved the low-rate cost.

    python3 bench/ab_rate.py --mpudp old=/tmp/old/mpudp.py --mpudp new=mpudp.py --go /work/go-original
    python3 bench/ab_rate.py --mpudp a=A.py --mpudp b=B.py --reps 5 --seconds 3 --save bench/results/X.json
    python3 bench/ab_rate.py --mpudp ab=mpudp.py --mpudp agg=mpudp.py --client 'agg={"aggregate": true}' \
        --rate 100 --sizes 200 --reps 10 --seconds 5 --pin

bench.py's paced stream (1000 pps by default, 64 and 1200 B) through the floor,
the Go original (with --go) and each named mpudp.py, every one a real client
and server with two links as bench.py starts them.  Each repetition runs every
path's window back to back, in order, reversed every other repetition.
`--client NAME=JSON` adds client config keys to one variant (the same file
in active-backup and aggregate, say).
Prints, per size, the relay CPU per echoed packet (client + server) and the
added p50 round trip of each path, median [min-max], and for every mpudp
variant its ratio to the first variant, to the Go original and its difference
from the floor, taken per repetition.  The figures are bench.py's: compare only
within one run.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import harness
import params
from params import HOST

SIZES = (64, 1200)


def spread(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return {"median": values[len(values) // 2] if len(values) % 2 else
            (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2, "min": values[0], "max": values[-1],
            "runs": values}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cpu_us(r):
    cpu = r["cpu"]
    if not r["received"] or "client" not in cpu or "server" not in cpu:
        return None
    return (cpu["client"]["s"] + cpu["server"]["s"]) / r["received"] * 1e6


def p50_ms(r):
    return r["latency"].get("p50_ms")


def start_variant(bench, name, path, client_extra):
    """A server and a client of the mpudp.py at `path` (bench.relay with another file),
    the client's config with `client_extra`'s keys."""
    saved = harness.MPUDP
    harness.MPUDP = path
    try:
        return bench.relay("-" + name, client_extra)
    finally:
        harness.MPUDP = saved


def run(args):
    workdir = tempfile.mkdtemp(prefix="mpudp-ab-")
    go = harness.GoOriginal(args.go) if args.go else None
    bench = harness.Bench(dict(params.FULL), args.python, workdir, go=go)
    try:
        bench.echo = bench.helper("echo")
        bench.echo_addr = [HOST, bench.echo.ready["port"]]
        bench.loadgen = bench.helper("loadgen")
        pairs = {"floor": bench.floor()}
        if go:
            pairs["go"] = bench.go_relay()
        for name, path in args.mpudp:
            harness.subprocess.run([args.python, "-m", "compileall", "-q", path], check=False,
                                   stdout=harness.subprocess.DEVNULL)
            pairs[name] = start_variant(bench, name, path, args.client.get(name, {}))
        for name, pair in pairs.items():
            bench.wait_forwarding(pair["addr"], name)
        if args.pin:  # the same placement for every path: client and generator on one core, the rest on the other
            cores = sorted(os.sched_getaffinity(0))
            for pair in pairs.values():
                os.sched_setaffinity(pair["client"].pid, {cores[0]})
                os.sched_setaffinity(pair["server"].pid, {cores[-1]})
            os.sched_setaffinity(bench.loadgen.pid, {cores[0]})
            os.sched_setaffinity(bench.echo.pid, {cores[-1]})
        time.sleep(1.0)
        order = list(pairs)
        runs = {}
        for rep in range(args.reps):
            for size in args.sizes:
                for name in (order if rep % 2 == 0 else order[::-1]):
                    pair = pairs[name]
                    pids = {"client": pair["client"].pid, "server": pair["server"].pid}
                    cmd = {"cmd": "rate", "rate": args.rate, "target": pair["addr"], "size": size,
                           "phase": bench.next_phase(), "warmup": 0.5, "pids": pids, "duration": args.seconds}
                    r = bench.loadgen.ask(cmd, args.seconds + 20)
                    runs.setdefault((size, name), []).append({"cpu_us": cpu_us(r), "p50_ms": p50_ms(r),
                                                              "loss": r.get("loss")})
                    harness.progress("rep %d %4d B %-8s %6.1f us/pkt  p50 %.3f ms" % (
                        rep + 1, size, name, runs[(size, name)][-1]["cpu_us"] or 0, p50_ms(r) or 0))
                cmd = {"cmd": "rate", "rate": args.rate, "target": bench.echo_addr, "size": size,
                       "phase": bench.next_phase(), "warmup": 0.5, "pids": {}, "duration": args.seconds}
                direct = bench.loadgen.ask(cmd, args.seconds + 20)
                runs.setdefault((size, "direct"), []).append({"p50_ms": p50_ms(direct)})
        return summarize(args, order, runs)
    finally:
        bench.kids.close()


def per_repetition(rows, others, key, combine):
    """combine(row[key], other[key]) for each repetition where both were measured, summarized."""
    return spread([combine(a[key], b[key]) if a[key] is not None and b[key] is not None else None
                   for a, b in zip(rows, others)])


def summarize(args, order, runs):
    variants = [name for name, _ in args.mpudp]
    out = {"schema": "mpudp-ab-rate/1", "rate_pps": args.rate, "pinned": args.pin, "seconds": args.seconds,
           "reps": args.reps, "mpudp": {name: dict({"path": path, "sha256": sha256(path)},
                                                   **({"client": args.client[name]} if name in args.client else {}))
                                              for name, path in args.mpudp},
           "machine": harness.machine_info(args.python), "git": harness.git_info(), "sizes": {}}
    for size in args.sizes:
        direct = runs[(size, "direct")]
        added = {name: [{"added": r["p50_ms"] - d["p50_ms"] if None not in (r["p50_ms"], d["p50_ms"]) else None}
                        for r, d in zip(runs[(size, name)], direct)] for name in order}
        table = {}
        for name in order:
            rs = runs[(size, name)]
            row = {"cpu_us": spread([r["cpu_us"] for r in rs]),
                   "added_p50_ms": spread([a["added"] for a in added[name]])}
            if name in variants:
                row["over_first"] = per_repetition(rs, runs[(size, variants[0])], "cpu_us", lambda a, b: a / b)
                row["minus_floor_us"] = per_repetition(rs, runs[(size, "floor")], "cpu_us", lambda a, b: a - b)
                if "go" in order:
                    row["over_go"] = per_repetition(rs, runs[(size, "go")], "cpu_us", lambda a, b: a / b)
                    row["p50_over_go"] = per_repetition(added[name], added["go"], "added",
                                                        lambda a, b: a / b if b > 0 else None)
            table[name] = row
        out["sizes"][str(size)] = table
    return out


def show(result):
    def fmt(figure, f="%.1f"):
        return "-" if not figure else (f + " [" + f + "-" + f + "]") % (figure["median"], figure["min"], figure["max"])

    print("%d pps, %d x %g s, %s, commit %s" % (
        result["rate_pps"], result["reps"], result["seconds"],
        "pinned (clients and the generator on one core, servers and the echo on the other)"
        if result.get("pinned") else "not pinned", result["git"].get("commit", "?")[:12]))
    for size, table in sorted(result["sizes"].items(), key=lambda item: int(item[0])):
        print("\n%s B          CPU us/echoed pkt       added p50 ms               /first              -floor us"
              "             /Go                p50/Go" % size)
        for name, row in table.items():
            print("%-10s %-24s %-26s %-19s %-21s %-18s %s" % (
                name, fmt(row["cpu_us"]), fmt(row["added_p50_ms"], "%.3f"), fmt(row.get("over_first"), "%.2f"),
                fmt(row.get("minus_floor_us")), fmt(row.get("over_go"), "%.2f"), fmt(row.get("p50_over_go"), "%.2f")))
    for name, info in result["mpudp"].items():
        print("%s: %s (sha256 %s)%s" % (name, info["path"], info["sha256"][:12],
                                        " client %s" % json.dumps(info["client"]) if "client" in info else ""))


def parse_client_extras(items, variants, parser):
    """{variant: {key: value}} from NAME=JSON items; parser.error for a bad one."""
    extras = {}
    for item in items:
        name, _, text = item.partition("=")
        if name not in variants:
            parser.error("--client %s: no --mpudp variant named %r" % (item, name))
        try:
            extra = json.loads(text)
        except ValueError as exc:
            parser.error("--client %s: not JSON: %s" % (item, exc))
        if not isinstance(extra, dict):
            parser.error("--client %s: a JSON object of client keys is needed" % item)
        extras.setdefault(name, {}).update(extra)
    return extras


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpudp", action="append", default=[], metavar="NAME=PATH",
                        help="an mpudp.py to measure (repeatable; the first is the reference)")
    parser.add_argument("--go", help="the Go original's directory (mpudp and keygen)")
    parser.add_argument("--client", action="append", default=[], metavar="NAME=JSON",
                        help="client config keys for variant NAME, as a JSON object (repeatable)")
    parser.add_argument("--rate", type=int, default=params.RATE)
    parser.add_argument("--sizes", default=",".join(str(size) for size in SIZES), help="payload sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--pin", action="store_true", help="pin every client and the generator to the first core, "
                        "servers and the echo to the last (fewer placement effects; not how users run it)")
    parser.add_argument("--save", help="also write the JSON result here")
    parser.add_argument("--show", help="print a saved result and exit")
    args = parser.parse_args(argv)
    if args.show:
        with open(args.show) as f:
            show(json.load(f))
        return 0
    args.mpudp = [tuple(item.split("=", 1)) if "=" in item else (os.path.basename(item), item) for item in args.mpudp]
    args.mpudp = [(name, os.path.abspath(path)) for name, path in args.mpudp] or [("mpudp", params.MPUDP)]
    args.sizes = [int(size) for size in args.sizes.split(",")]
    args.client = parse_client_extras(args.client, [name for name, _ in args.mpudp], parser)
    result = run(args)
    show(result)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
