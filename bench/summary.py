"""From the raw windows of a run (harness.Bench.run) to the figures of the JSON result.

Every figure is the median of its repetitions with their spread; a ratio or a
difference between two paths is taken per repetition (the windows of one
repetition run back to back), then the median of those.  Pure: no processes,
no sockets, so a saved result can be summarized again.
"""

import os

from params import RATE, REDUNDANCY, REDUNDANT_SIZE, SIZES

# Targets: (key in the flat figures, label, op, limit).  The first group is the benchmark
# issue's, absolute; the second, issue 15's, ratios to the floor and the Go original of the
# same run (the Go ones are judged only when the Go original was measured).
TARGETS = [
    ("ratio_sat_1200", "delivered 1200 B pkt/s, relay/direct", ">=", 0.25),
    ("cpu_sat_64", "relay CPU/pkt at saturation, 64 B (us)", "<=", 25.0),
    ("cpu_sat_1200", "relay CPU/pkt at saturation, 1200 B (us)", "<=", 25.0),
    ("cpu_rate_64", "relay CPU/pkt at 1000 pps, 64 B (us)", "<=", 100.0),
    ("cpu_rate_1200", "relay CPU/pkt at 1000 pps, 1200 B (us)", "<=", 100.0),
    ("added_p50_64", "added RTT p50 at 1000 pps, 64 B (ms)", "<=", 0.15),
    ("added_p50_1200", "added RTT p50 at 1000 pps, 1200 B (ms)", "<=", 0.15),
    ("rss_idle_client_mb", "idle RSS, client (MB)", "<", 20.0),
    ("rss_idle_server_mb", "idle RSS, server (MB)", "<", 20.0),
    ("startup_ms", "start-up to forwarding (ms)", "<", 200.0),
    ("failover_gap_s", "failover gap, active link blackholed (s)", "<", 1.0),
    ("r2_duplicates", "echoes delivered twice, redundancy 2", "<=", 0),
    ("floor_sat_1200", "1200 B saturation pkt/s, mpudp/floor", ">=", 0.9),
    ("floor_cpu_sat_1200", "CPU/pkt at saturation 1200 B, mpudp/floor", "<=", 1.1),
    ("floor_cpu_rate_64", "CPU/pkt at 1000 pps 64 B, mpudp-floor (us)", "<=", 40.0),
    ("floor_cpu_rate_1200", "CPU/pkt at 1000 pps 1200 B, mpudp-floor (us)", "<=", 40.0),
    ("go_sat_1200", "1200 B saturation pkt/s, mpudp/Go", ">=", 1.0),
    ("go_cpu_rate_64", "CPU/pkt at 1000 pps 64 B, mpudp/Go", "<=", 1.0),
    ("go_cpu_rate_1200", "CPU/pkt at 1000 pps 1200 B, mpudp/Go", "<=", 1.0),
    ("go_added_p50_64", "added RTT p50 at 1000 pps 64 B, mpudp/Go", "<=", 1.0),
    ("go_added_p50_1200", "added RTT p50 at 1000 pps 1200 B, mpudp/Go", "<=", 1.0),
]


def spread(values):
    """{median, min, max, runs} of the values that exist (None: a run without a figure)."""
    present = sorted(v for v in values if v is not None)
    out = {"runs": values}
    if present:
        n = len(present)
        median = present[n // 2] if n % 2 else (present[n // 2 - 1] + present[n // 2]) / 2.0
        out.update(median=median, min=present[0], max=present[-1])
    else:
        out.update(median=None, min=None, max=None)
    return out


def summarize_steady(runs, idle, hwm, codes):
    out = {"throughput": {}, "latency": {}, "cpu": {}, "rss_kb": {}, "steady_exit": codes}
    for kind in ("sat", "rate"):
        label = "saturation" if kind == "sat" else "rate_%d" % RATE
        tp, cpu = out["throughput"].setdefault(label, {}), out["cpu"].setdefault(label, {})
        for size in SIZES:
            direct, relay = runs[(kind, size, "direct")], runs[(kind, size, "relay")]
            entry = {}
            for path, rs in (("direct", direct), ("relay", relay)):
                entry[path] = {"pps": spread([r["pps"] for r in rs]), "mbps": spread([r["mbps"] for r in rs]),
                               "lost": [r["lost"] for r in rs], "received": [r["received"] for r in rs]}
                if kind == "rate":
                    entry[path]["loss"] = spread([r["loss"] for r in rs])
                entry[path]["background_cores"] = spread([background_cores(r) for r in rs])
            entry["ratio"] = spread([r["pps"] / d["pps"] if d["pps"] else None for d, r in zip(direct, relay)])
            tp[str(size)] = entry
            c = {}
            for who in ("client", "server", "echo", "loadgen"):
                rs = relay if who in ("client", "server") else direct
                c["%s_s_per_Mpkt" % who] = spread([
                    r["cpu"][who]["s"] / r["received"] * 1e6 if r["received"] and who in r["cpu"] else None
                    for r in rs])
            c["relay_us_per_pkt"] = spread([
                (r["cpu"]["client"]["s"] + r["cpu"]["server"]["s"]) / r["received"] * 1e6
                if r["received"] and "client" in r["cpu"] and "server" in r["cpu"] else None for r in relay])
            c["relay_us_per_pkt_stat"] = spread([
                (r["cpu"]["client"]["stat_s"] + r["cpu"]["server"]["stat_s"]) / r["received"] * 1e6
                if r["received"] and "client" in r["cpu"] and "server" in r["cpu"] else None for r in relay])
            c["cpu_source"] = relay[0]["cpu"].get("client", {}).get("source")
            c["core_share"] = {}  # share of one core each process got during the window
            for path, rs in (("direct", direct), ("relay", relay)):
                c["core_share"][path] = {
                    who: spread([r["cpu"][who]["s"] / r["seconds"] if r["seconds"] and who in r["cpu"] else None
                                 for r in rs])["median"]
                    for who in ("client", "server", "echo", "loadgen") if who in rs[0]["cpu"]}
            cpu[str(size)] = c
            if kind == "rate":
                lat = {}
                for path, rs in (("direct", direct), ("relay", relay)):
                    lat[path] = {q: spread([r["latency"].get(q) for r in rs]) for q in ("p50_ms", "p90_ms", "p99_ms")}
                lat["added_p50_ms"] = spread([
                    r["latency"]["p50_ms"] - d["latency"]["p50_ms"]
                    if r["latency"].get("p50_ms") is not None and d["latency"].get("p50_ms") is not None else None
                    for d, r in zip(direct, relay)])
                lat["added_p99_ms"] = spread([
                    r["latency"]["p99_ms"] - d["latency"]["p99_ms"]
                    if r["latency"].get("p99_ms") is not None and d["latency"].get("p99_ms") is not None else None
                    for d, r in zip(direct, relay)])
                out["latency"][str(size)] = lat
            else:
                out["latency"].setdefault("saturation", {})[str(size)] = {
                    path: {"p50_ms": spread([r["latency"].get("p50_ms") for r in rs])}
                    for path, rs in (("direct", direct), ("relay", relay))}
    out["loadgen_rcvbuf"] = runs[("sat", SIZES[0], "direct")][0].get("rcvbuf")
    every = [background_cores(r) for rs in runs.values() for r in rs]
    every = [v for v in every if v is not None]
    out["background_cores"] = {"median": spread(every)["median"], "max": max(every) if every else None,
                               "note": "CPU used by anything but the benchmark's processes during the "
                                       "measured windows, in cores (the machine has %s)" % os.cpu_count()}
    for who in ("client", "server"):
        loads = [r["rss_kb"].get(who) for key, rs in runs.items() if key[0] == "sat" and key[2] == "relay"
                 for r in rs]
        loads = [v for v in loads if v is not None]
        out["rss_kb"][who] = {"idle": idle.get(who), "load": max(loads) if loads else None, "peak_hwm": hwm.get(who)}
    return out


def background_cores(r):
    b = r["cpu"].get("_background")
    return b["other_s"] / r["seconds"] if b and r["seconds"] else None


def relay_us_per_pkt(r, who=("client", "server")):
    """CPU us of `who` (the relay: client + server) per echoed packet of one measurement."""
    if not r["received"] or any(w not in r["cpu"] for w in who):
        return None
    return sum(r["cpu"][w]["s"] for w in who) / r["received"] * 1e6


def ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def added_p50(r, direct):
    a, d = r["latency"].get("p50_ms"), direct["latency"].get("p50_ms")
    return a - d if a is not None and d is not None else None


def summarize_floor(runs):
    """At RATE: the bare forwarders ("floor") against the direct path and the relay of the
    same repetition: what any CPython relay of this shape pays, and what mpudp adds to it."""
    out = {}
    for size in SIZES:
        direct, relay, floor = (runs[("rate", size, path)] for path in ("direct", "relay", "floor"))
        floor_cpu = [relay_us_per_pkt(r) for r in floor]
        floor_added = [added_p50(f, d) for f, d in zip(floor, direct)]
        out[str(size)] = {
            "relay_us_per_pkt": spread(floor_cpu),
            "added_p50_ms": spread(floor_added),
            "loss": spread([r["loss"] for r in floor]),
            "mpudp_minus_floor_us_per_pkt": spread([
                relay_us_per_pkt(r) - f if relay_us_per_pkt(r) is not None and f is not None else None
                for r, f in zip(relay, floor_cpu)]),
            "mpudp_minus_floor_added_p50_ms": spread([
                added_p50(r, d) - f if added_p50(r, d) is not None and f is not None else None
                for r, d, f in zip(relay, direct, floor_added)]),
        }
    return out


def summarize_redundancy(runs, counters, codes):
    """Redundancy 1 ("r1": the relay of summarize_steady) against REDUNDANCY ("r2") at
    REDUNDANT_SIZE, ratios r2/r1 per repetition; echoes delivered twice; the relays' counters."""
    out = {"redundancy": REDUNDANCY, "size": REDUNDANT_SIZE, "exit": codes}
    labels = {"r1": "relay", "r2": "redundant"}
    for kind in ("sat", "rate"):
        direct = runs[(kind, REDUNDANT_SIZE, "direct")]
        entry = {}
        for name, path in labels.items():
            rs = runs[(kind, REDUNDANT_SIZE, path)]
            e = {"pps": spread([r["pps"] for r in rs]), "mbps": spread([r["mbps"] for r in rs]),
                 "relay_us_per_pkt": spread([relay_us_per_pkt(r) for r in rs]),
                 "client_us_per_pkt": spread([relay_us_per_pkt(r, ("client",)) for r in rs]),
                 "server_us_per_pkt": spread([relay_us_per_pkt(r, ("server",)) for r in rs]),
                 "received": [r["received"] for r in rs], "lost": [r["lost"] for r in rs],
                 "duplicates": [r.get("duplicates") for r in rs], "seconds": [r["seconds"] for r in rs],
                 "background_cores": spread([background_cores(r) for r in rs])}
            if kind == "rate":
                e["loss"] = spread([r["loss"] for r in rs])
                e["p50_ms"] = spread([r["latency"].get("p50_ms") for r in rs])
                e["p99_ms"] = spread([r["latency"].get("p99_ms") for r in rs])
                e["added_p50_ms"] = spread([added_p50(r, d) for r, d in zip(rs, direct)])
            entry[name] = e
        pairs = list(zip(runs[(kind, REDUNDANT_SIZE, "relay")], runs[(kind, REDUNDANT_SIZE, "redundant")], direct))
        entry["ratio"] = {"pps": spread([ratio(r2["pps"], r1["pps"]) for r1, r2, _ in pairs]),
                          "relay_us_per_pkt": spread([ratio(relay_us_per_pkt(r2), relay_us_per_pkt(r1))
                                                      for r1, r2, _ in pairs])}
        if kind == "rate":
            entry["ratio"]["added_p50_ms"] = spread([ratio(added_p50(r2, d), added_p50(r1, d))
                                                     for r1, r2, d in pairs])
        out["saturation" if kind == "sat" else "rate_%d" % RATE] = entry
    # Every echo the generator got twice, on every path and size: must be 0.
    out["duplicates_delivered"] = {path: sum(r.get("duplicates") or 0 for key, rs in runs.items()
                                             if key[2] == path for r in rs)
                                   for path in ("direct", "relay", "redundant")}
    out["counters"] = {}
    for name, path in labels.items():
        sent = sum(r.get("sent_total", r["sent"]) for key, rs in runs.items() if key[2] == path for r in rs)
        c = dict(counters.get(path, {}), datagrams_sent=sent)
        server = c.get("server")
        # Copies the server dropped per datagram sent: 0 with redundancy 1, about 1 with 2.
        c["server_duplicate_per_datagram"] = (server.get("duplicate", 0) / float(sent)
                                              if server is not None and sent else None)
        out["counters"][name] = c
    return out


# The figures compared side by side: (key, label, unit, which is better, per-repetition
# value of one path's window given the direct path's window of the same repetition).
COMPARED = [("sat_pps_%d" % size, "saturation %d B, echoed pkt/s" % size, "pkt/s", "higher", "sat", size,
             lambda r, d: r["pps"]) for size in SIZES] + [
    ("cpu_sat_%d" % size, "relay CPU us/echoed pkt, saturation %d B" % size, "us", "lower", "sat", size,
     lambda r, d: relay_us_per_pkt(r)) for size in SIZES] + [
    ("cpu_rate_%d" % size, "relay CPU us/echoed pkt, %d pps %d B" % (RATE, size), "us", "lower", "rate", size,
     lambda r, d: relay_us_per_pkt(r)) for size in SIZES] + [
    ("added_p50_%d" % size, "added RTT p50 ms, %d pps %d B" % (RATE, size), "ms", "lower", "rate", size,
     added_p50) for size in SIZES]
RELAYS = ("floor", "go", "relay")  # the columns; "relay" is mpudp


def summarize_comparison(runs, idle_rss_kb, go_measured):
    """mpudp beside the floor and the Go original (when measured), every figure of COMPARED
    and the idle RSS of each process: each path's spread, mpudp/Go and mpudp/floor per
    repetition, and mpudp - floor for CPU and latency."""
    rows = {}
    for key, label, unit, better, kind, size, value in COMPARED:
        direct = runs[(kind, size, "direct")]
        per_path = {path: [value(r, d) for r, d in zip(runs[(kind, size, path)], direct)]
                    for path in RELAYS if (kind, size, path) in runs}
        row = {"label": label, "unit": unit, "better": better,
               "direct": spread([r["pps"] for r in direct]) if unit == "pkt/s" else None, "go": None}
        row.update({path: spread(values) for path, values in per_path.items()})
        for other in ("go", "floor"):
            row["mpudp_over_%s" % other] = spread([ratio(m, o) for m, o in zip(
                per_path["relay"], per_path[other])]) if other in per_path else None
        if unit != "pkt/s":
            row["mpudp_minus_floor"] = spread([m - f if m is not None and f is not None else None
                                               for m, f in zip(per_path["relay"], per_path["floor"])])
        else:
            row["over_direct"] = {path: spread([ratio(v, d["pps"]) for v, d in zip(values, direct)])
                                  for path, values in per_path.items()}
            # Datagrams lost, and 100 ms silences that freed the window: a path that drops at
            # saturation loses pkt/s to the generator's waits too.
            for what in ("lost", "timeouts"):
                row[what] = {path: [r.get(what) for r in runs[(kind, size, path)]]
                             for path in ("direct",) + tuple(per_path)}
        rows[key] = row
    for who in ("client", "server"):
        mb = {path: idle_mb(idle_rss_kb, path, who) for path in RELAYS if path in idle_rss_kb}
        row = {"label": "idle RSS MB, %s process" % who, "unit": "MB", "better": "lower", "direct": None, "go": None}
        row.update({path: spread([value]) for path, value in mb.items()})
        for other in ("go", "floor"):
            row["mpudp_over_%s" % other] = spread([ratio(mb["relay"], mb[other])]) if other in mb else None
        rows["rss_idle_%s" % who] = row
    order = [c[0] for c in COMPARED] + ["rss_idle_client", "rss_idle_server"]
    return {"go_measured": go_measured, "order": order, "rows": rows,
            "note": "medians of the repetitions [min-max]; ratios and differences per repetition, "
                    "then their median; idle RSS is one reading per process (bytecode cached)"}


def idle_mb(idle_rss_kb, path, who):
    kb = idle_rss_kb.get(path, {}).get(who)
    return kb / 1024.0 if kb is not None else None


def flat_figures(result):
    """The figures the targets are judged on, by name (None: not measured)."""
    f = {}
    tp, cpu, lat = result["throughput"], result["cpu"], result["latency"]
    f["ratio_sat_1200"] = tp["saturation"]["1200"]["ratio"]["median"]
    for size in SIZES:
        f["cpu_sat_%d" % size] = cpu["saturation"][str(size)]["relay_us_per_pkt"]["median"]
        f["cpu_rate_%d" % size] = cpu["rate_%d" % RATE][str(size)]["relay_us_per_pkt"]["median"]
        f["added_p50_%d" % size] = lat[str(size)]["added_p50_ms"]["median"]
    for who in ("client", "server"):
        kb = result["rss_kb"][who]["idle"]
        f["rss_idle_%s_mb" % who] = kb / 1024.0 if kb is not None else None
    f["startup_ms"] = result["startup"]["ms"]["median"]
    f["failover_gap_s"] = result["failover"]["gap_s"]["median"]
    red = result.get("redundancy")
    f["r2_duplicates"] = red["duplicates_delivered"]["redundant"] if red else None
    rows = (result.get("comparison") or {}).get("rows")
    if rows:
        median = lambda row, key: (rows[row].get(key) or {}).get("median")
        f["floor_sat_1200"] = median("sat_pps_1200", "mpudp_over_floor")
        f["floor_cpu_sat_1200"] = median("cpu_sat_1200", "mpudp_over_floor")
        f["go_sat_1200"] = median("sat_pps_1200", "mpudp_over_go")
        for size in SIZES:
            f["floor_cpu_rate_%d" % size] = median("cpu_rate_%d" % size, "mpudp_minus_floor")
            f["go_cpu_rate_%d" % size] = median("cpu_rate_%d" % size, "mpudp_over_go")
            f["go_added_p50_%d" % size] = median("added_p50_%d" % size, "mpudp_over_go")
    return f


def go_figure(result, key):
    """The Go original's figure of the same run for a target of the first group, or None."""
    rows = (result.get("comparison") or {}).get("rows") or {}
    if key == "ratio_sat_1200":
        return ((rows.get("sat_pps_1200") or {}).get("over_direct") or {}).get("go", {}).get("median")
    row = rows.get(key[:-3] if key.endswith("_mb") else key) or {}
    return (row.get("go") or {}).get("median")


def judge(result):
    """Each target of TARGETS as {key, label, op, limit, value, pass, go}; the Go original's
    targets only when it was measured."""
    figures = flat_figures(result)
    go_measured = (result.get("comparison") or {}).get("go_measured")
    out = []
    for key, label, op, limit in TARGETS:
        if key.startswith("go_") and not go_measured:
            continue
        if key.startswith("floor_") and not result.get("comparison"):
            continue
        value = figures.get(key)
        if value is None:
            ok = False
        elif op == ">=":
            ok = value >= limit
        elif op == "<=":
            ok = value <= limit
        else:
            ok = value < limit
        out.append({"key": key, "label": label, "op": op, "limit": limit, "value": value, "pass": ok,
                    "go": go_figure(result, key)})
    return out


def summarize_run(raw):
    """The JSON result (schema mpudp-bench/1) of a run's raw results (harness.Bench.run)."""
    steady = raw.pop("steady")
    runs = steady["runs"]
    result = dict(raw)
    result.update(summarize_steady(runs, steady["idle_rss_kb"]["relay"], steady["hwm_kb"]["relay"],
                                   steady["exit"]["relay"]))
    result["redundancy"] = summarize_redundancy(runs, steady["counters"], steady["exit"]["redundant"])
    result["floor"] = summarize_floor(runs)
    result["comparison"] = summarize_comparison(runs, steady["idle_rss_kb"], "go" in steady["paths"])
    result["idle_rss_kb"] = steady["idle_rss_kb"]
    result["peak_rss_kb"] = steady["hwm_kb"]
    result["exit"] = steady["exit"]
    startup = result["startup"]
    startup["ms"] = spread([r["ms"] for r in startup["runs"]])
    startup["client_only_ms"] = spread([r["client_only_ms"] for r in startup["runs"]])
    result["failover"]["gap_s"] = spread([r["gap_s"] for r in result["failover"]["runs"]])
    restarts = result["restart"]["runs"]
    result["restart"].update(resume_s=spread([r["resume_s"] for r in restarts]),
                             outage_s=spread([r["outage_s"] for r in restarts]))
    return result
