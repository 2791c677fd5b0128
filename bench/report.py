"""The benchmark's table: a JSON result (summary.summarize_run, or a saved file) as text."""

from params import RATE, SIZES


def fmt(value, digits=0, thousands=True):
    if value is None:
        return "-"
    if thousands and digits == 0:
        return "{:,.0f}".format(value)
    return "%.*f" % (digits, value)


def cell(s, digits=0, unit=""):
    """median [min-max] of a spread ([min..max] when one is negative); `unit` after the median."""
    if s is None or s.get("median") is None:
        return "-"
    if s.get("min") == s.get("max") or len([v for v in s["runs"] if v is not None]) < 2:
        return fmt(s["median"], digits) + unit
    dash = ".." if s["min"] < 0 or s["max"] < 0 else "-"
    return "%s%s [%s%s%s]" % (fmt(s["median"], digits), unit, fmt(s["min"], digits), dash, fmt(s["max"], digits))


def render(result):
    lines = []
    add = lines.append
    m = result["machine"]
    reps = result["params"]["reps"]
    add("mpudp %s benchmark, %s%s" % (result["mpudp"]["version"], result.get("date", ""),
                                      "  (--quick: NOT comparable)" if result.get("quick") else ""))
    add("machine: %s, %s cores, Python %s (%s), kernel %s" % (
        m["cpu_model"], m["cores"], m["python"], m["implementation"], m["kernel"]))
    git = result["mpudp"]["git"]
    add("commit %s%s; %d run(s) per figure, shown as median [min-max]; run took %.0f s" % (
        (git["commit"] or "?")[:12], " + uncommitted mpudp.py" if git["mpudp_py_modified"] else "", reps,
        result.get("elapsed_s", 0)))
    add("")
    if result.get("comparison"):
        render_comparison(result["comparison"], reps, add)
        add("")
    w = (28, 26, 26, 20)
    row = lambda *c: add("".join(str(x).ljust(n) for x, n in zip(c, w)).rstrip())
    row("", "direct (gen->echo)", "relay (gen->client->server->echo)", "")
    row("THROUGHPUT", "", "", "relay/direct")
    for label, key in (("saturation", "saturation"), ("%d pps" % RATE, "rate_%d" % RATE)):
        for size in SIZES:
            e = result["throughput"][key][str(size)]
            row("%s %d B  pkt/s" % (label, size), cell(e["direct"]["pps"]), cell(e["relay"]["pps"]),
                cell(e["ratio"], 2))
            row("%s %d B  Mbit/s" % (label, size), cell(e["direct"]["mbps"], 1), cell(e["relay"]["mbps"], 1), "")
            if key != "saturation":
                row("%s %d B  loss %%" % (label, size), cell(pct(e["direct"]["loss"]), 2),
                    cell(pct(e["relay"]["loss"]), 2), "")
    add("")
    row("LATENCY (RTT, ms)", "", "", "added by relay")
    for size in SIZES:
        l = result["latency"][str(size)]
        row("%d pps %d B  p50" % (RATE, size), cell(l["direct"]["p50_ms"], 3), cell(l["relay"]["p50_ms"], 3),
            "+" + cell(l["added_p50_ms"], 3))
        row("%d pps %d B  p99" % (RATE, size), cell(l["direct"]["p99_ms"], 3), cell(l["relay"]["p99_ms"], 3),
            "+" + cell(l["added_p99_ms"], 3))
    for size in SIZES:
        l = result["latency"]["saturation"][str(size)]
        row("saturation %d B  p50" % size, cell(l["direct"]["p50_ms"], 3), cell(l["relay"]["p50_ms"], 3),
            "(window %d)" % result["params"]["window"])
    add("")
    add("CPU per echoed packet (us = CPU s per million packets; source: %s)" % (
        result["cpu"]["saturation"]["1200"].get("cpu_source")))
    w2 = (24, 20, 20, 24, 40)
    row2 = lambda *c: add("".join(str(x).ljust(n) for x, n in zip(c, w2)).rstrip())
    row2("", "client", "server", "relay (client+server)", "core share: client/server/echo/loadgen")
    for label, key in (("saturation", "saturation"), ("%d pps" % RATE, "rate_%d" % RATE)):
        for size in SIZES:
            c = result["cpu"][key][str(size)]
            share = c["core_share"]["relay"]
            row2("%s %d B" % (label, size), cell(c["client_s_per_Mpkt"], 1), cell(c["server_s_per_Mpkt"], 1),
                 cell(c["relay_us_per_pkt"], 1),
                 "/".join("%.0f%%" % (100 * share[k]) if share.get(k) is not None else "-"
                          for k in ("client", "server", "echo", "loadgen")))
    for size in SIZES:
        c = result["cpu"]["saturation"][str(size)]
        share = c["core_share"]["direct"]
        row2("direct path sat. %d B" % size, "echo %s" % cell(c["echo_s_per_Mpkt"], 1),
             "gen %s" % cell(c["loadgen_s_per_Mpkt"], 1), "",
             "-/-/" + "/".join("%.0f%%" % (100 * share[k]) if share.get(k) is not None else "-"
                               for k in ("echo", "loadgen")))
    add("")
    if result.get("floor"):
        render_floor(result, row)
        add("")
    if result.get("redundancy"):
        render_redundancy(result["redundancy"], result["params"], row, add)
        add("")
    add("MEMORY (VmRSS, MB)      idle      under load   peak (VmHWM)")
    for who in ("client", "server"):
        r = result["rss_kb"][who]
        add("  %-20s  %-9s %-12s %s" % (who, mb(r["idle"]), mb(r["load"]), mb(r["peak_hwm"])))
    add("  (a bare interpreter here: %s MB)" % mb(result["startup"].get("python_bare_rss_kb")))
    add("")
    s = result["startup"]
    add("START-UP to forwarding, fresh server + client: %s ms" % cell(s["ms"], 1))
    add("  for reference: a fresh client alone %s ms; python3 -c pass %s ms; mpudp.py --version %s ms" % (
        cell(s.get("client_only_ms"), 1), s["python_startup_ms"], s["mpudp_version_ms"]))
    fo, rs = result["failover"], result["restart"]
    add("FAILOVER gap at %d pps, active link blackholed: %s s" % (
        result["params"]["failover_rate_pps"], cell(fo["gap_s"], 3)))
    add("SERVER RESTART: first echo %s s after the new server's spawn; outage %s s" % (
        cell(rs["resume_s"], 3), cell(rs["outage_s"], 3)))
    bg = result.get("background_cores") or {}
    if bg.get("median") is not None:
        add("Background CPU (other processes) during the measured windows: median %.2f, max %.2f cores" % (
            bg["median"], bg["max"]))
        for key, what in (("saturation", "saturation throughput is understated"),
                          ("rate_%d" % RATE, "the %d pps latencies may be inflated" % RATE)):
            entries = [(e, ("direct", "relay")) for e in result["throughput"][key].values()]
            if result.get("redundancy"):
                entries.append((result["redundancy"][key], ("r2",)))
            busy = [v for e, paths in entries for path in paths
                    for v in e[path].get("background_cores", {}).get("runs", []) if v is not None and v > 0.25]
            if busy:
                add("  ** %d %s window(s) had more than 0.25 cores of other load: %s **" % (len(busy), key, what))
    add("")
    add("TARGETS                                              value      target     Go original (%s)" % (
        "same run" if result.get("comparison") else "another day: not comparable"))
    for t in result["targets"]:
        digits = 3 if t["key"].startswith(("added", "failover", "ratio")) else 1
        if t["key"].startswith(("go_", "floor_sat", "floor_cpu_sat")):
            digits = 2  # a ratio mpudp/other
        limit_digits = 2 if t["limit"] < 2 else 1
        if isinstance(t["limit"], int):  # a count
            digits = limit_digits = 0
        go = t.get("go")
        add("  [%s] %-46s %-10s %-2s %-7s %s" % (
            "PASS" if t["pass"] else "FAIL", t["label"], fmt(t["value"], digits), t["op"],
            fmt(t["limit"], limit_digits, thousands=False), "-" if go is None else fmt(go, digits)))
    passed = sum(1 for t in result["targets"] if t["pass"])
    add("  %d of %d targets met" % (passed, len(result["targets"])))
    return "\n".join(lines)


def render_floor(result, row):
    """The floor rows: bare forwarders in place of client and server, at RATE."""
    row("FLOOR at %d pps" % RATE, "bare forwarders", "mpudp (relay)", "mpudp - floor")
    for size in SIZES:
        f, c = result["floor"][str(size)], result["cpu"]["rate_%d" % RATE][str(size)]
        row("%d B  CPU us/pkt" % size, cell(f["relay_us_per_pkt"], 1), cell(c["relay_us_per_pkt"], 1),
            cell(f["mpudp_minus_floor_us_per_pkt"], 1))
        row("%d B  added RTT p50 ms" % size, "+" + cell(f["added_p50_ms"], 3),
            "+" + cell(result["latency"][str(size)]["added_p50_ms"], 3), cell(f["mpudp_minus_floor_added_p50_ms"], 3))
    row("  (two stdlib selectors processes forwarding with recvfrom_into/send, no protocol)", "", "", "")


def render_redundancy(red, params, row, add):
    """The redundancy 2 against 1 rows (`row`, `add`: render's column and line writers)."""
    row("REDUNDANCY, %d B" % red["size"], "redundancy 1 (= relay)",
        "redundancy %d" % red["redundancy"], "r%d/r1" % red["redundancy"])
    sat, rate = red["saturation"], red["rate_%d" % RATE]
    row("saturation pkt/s", cell(sat["r1"]["pps"]), cell(sat["r2"]["pps"]), cell(sat["ratio"]["pps"], 2))
    row("saturation Mbit/s", cell(sat["r1"]["mbps"], 1), cell(sat["r2"]["mbps"], 1), "")
    row("saturation CPU us/pkt", cell(sat["r1"]["relay_us_per_pkt"], 1), cell(sat["r2"]["relay_us_per_pkt"], 1),
        cell(sat["ratio"]["relay_us_per_pkt"], 2))
    row("%d pps CPU us/pkt" % RATE, cell(rate["r1"]["relay_us_per_pkt"], 1),
        cell(rate["r2"]["relay_us_per_pkt"], 1), cell(rate["ratio"]["relay_us_per_pkt"], 2))
    for label, key in (("  client", "client_us_per_pkt"), ("  server", "server_us_per_pkt")):
        row(label, cell(rate["r1"][key], 1), cell(rate["r2"][key], 1), "")
    added = lambda s: "-" if s["median"] is None else "+" + cell(s, 3)
    row("%d pps added RTT p50 ms" % RATE, added(rate["r1"]["added_p50_ms"]), added(rate["r2"]["added_p50_ms"]),
        cell(rate["ratio"]["added_p50_ms"], 2))
    row("%d pps loss %%" % RATE, cell(pct(rate["r1"]["loss"]), 2), cell(pct(rate["r2"]["loss"]), 2), "")
    dup = red["duplicates_delivered"]
    row("echoes delivered twice", dup["relay"], dup["redundant"], "(direct %d)" % dup["direct"])
    copies = []
    for name in ("r1", "r2"):
        c = red["counters"][name]
        copies.append("%s / %s" % tuple("-" if c.get(who) is None else fmt(c[who].get("duplicate", 0))
                                        for who in ("server", "client")))
    row('"duplicate" server/client', copies[0], copies[1], "")
    per = red["counters"]["r2"].get("server_duplicate_per_datagram")
    add("  (r%d: windows of %.1f s at saturation and %.1f s at %d pps; its server dropped %s copies per datagram)" % (
        red["redundancy"], params.get("redundant_sat_s", 0), params.get("redundant_rate_s", 0), RATE, fmt(per, 2)))


def pct(s):
    """A spread of fractions as percentages."""
    if s is None:
        return None
    scale = lambda v: v * 100 if isinstance(v, (int, float)) else v
    out = {k: scale(v) for k, v in s.items() if k != "runs"}
    out["runs"] = [scale(v) for v in s["runs"]]
    return out


def mb(kb):
    return "-" if kb is None else "%.1f" % (kb / 1024.0)


DISPLAY = {"relay": "mpudp", "go": "Go original"}
COMPARISON_DIGITS = {"pkt/s": 0, "us": 1, "ms": 3, "MB": 1}


def render_comparison(comparison, reps, add):
    """The side-by-side rows: direct, floor, Go original, mpudp, mpudp/Go, mpudp/floor, mpudp-floor."""
    w = (46, 10, 10, 14, 10, 20, 20, 16)
    row = lambda *c: add("".join(str(x).ljust(n) for x, n in zip(c, w)).rstrip())
    add("SIDE BY SIDE, one run: median of %d interleaved repetition(s); ratios and differences taken per "
        "repetition, median [min-max]" % reps)
    row("", "direct", "floor", "Go original", "mpudp", "mpudp/Go", "mpudp/floor", "mpudp-floor")
    measured = comparison.get("go_measured")
    for key in comparison["order"]:
        r = comparison["rows"][key]
        digits = COMPARISON_DIGITS.get(r["unit"], 1)
        value = lambda s: "-" if s is None or s.get("median") is None else fmt(s["median"], digits)
        times = lambda s: "-" if s is None or s.get("median") is None else cell(s, 2, "x")
        go, go_ratio = (value(r["go"]), times(r["mpudp_over_go"])) if measured else ("not measured", "not measured")
        row(r["label"], value(r.get("direct")), value(r.get("floor")), go,
            value(r.get("relay")), go_ratio, times(r.get("mpudp_over_floor")),
            cell(r["mpudp_minus_floor"], digits) if r.get("mpudp_minus_floor") else "")
        stalls = {path: sum(n or 0 for n in runs) for path, runs in (r.get("timeouts") or {}).items()}
        lost = {path: sum(n or 0 for n in runs) for path, runs in (r.get("lost") or {}).items()}
        if any(stalls.values()) or any(lost.values()):
            add("  (lost datagrams / 100 ms waits that freed the window, all repetitions: %s)" % ", ".join(
                "%s %d/%d" % (DISPLAY.get(path, path), lost[path], stalls.get(path, 0))
                for path in lost if lost[path] or stalls.get(path)))
    add("  floor: two bare CPython forwarders (selectors, no protocol) in the client's and server's places; "
        "Go original: %s" % ("its client and server, built from its source" if measured
                             else "not measured (bench.py --go DIR)"))
