"""Smoke test of bench/bench.py: a --quick --json run finishes, reports every figure, delivers packets.

No timing assertions: the figures of a quick run on a shared machine mean nothing;
this only keeps the benchmark runnable (tox runs it on the newest supported Python,
to keep the matrix short; its modules are plain Python 3.7 too).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_quick_json():
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, "bench failed:\n" + proc.stderr[-4000:]
    result = json.loads(proc.stdout)

    for key in ("schema", "machine", "mpudp", "params", "throughput", "latency", "cpu", "rss_kb",
                "startup", "failover", "restart", "targets", "background_cores", "elapsed_s"):
        assert key in result, key
    assert result["quick"] is True
    for key in ("cpu_model", "cores", "python", "kernel"):
        assert result["machine"][key], key

    for phase in ("saturation", "rate_1000"):
        for size in ("64", "1200"):
            entry = result["throughput"][phase][size]
            for path in ("direct", "relay"):
                assert entry[path]["pps"]["median"] > 0, (phase, size, path)
                assert entry[path]["mbps"]["median"] > 0, (phase, size, path)
                assert all(n > 0 for n in entry[path]["received"]), (phase, size, path)
            assert entry["ratio"]["median"] > 0
            cpu = result["cpu"][phase][size]
            for key in ("client_s_per_Mpkt", "server_s_per_Mpkt", "relay_us_per_pkt"):
                assert cpu[key]["median"] is not None and cpu[key]["median"] > 0, (phase, size, key)
    for size in ("64", "1200"):
        latency = result["latency"][size]
        for path in ("direct", "relay"):
            for q in ("p50_ms", "p99_ms"):
                assert latency[path][q]["median"] > 0, (size, path, q)
        assert latency["added_p50_ms"]["median"] is not None

    for who in ("client", "server"):
        for key in ("idle", "load", "peak_hwm"):
            assert result["rss_kb"][who][key] > 0, (who, key)

    assert result["startup"]["ms"]["median"] > 0  # a first echo came through a fresh client + server
    assert "gap_s" in result["failover"] and "runs" in result["failover"]
    assert "resume_s" in result["restart"] and "outage_s" in result["restart"]

    red = result["redundancy"]  # redundancy 2 against 1, at 1200 B
    for phase in ("saturation", "rate_1000"):
        for name in ("r1", "r2"):
            assert red[phase][name]["pps"]["median"] > 0, (phase, name)
            assert red[phase][name]["relay_us_per_pkt"]["median"] > 0, (phase, name)
        assert red[phase]["ratio"]["relay_us_per_pkt"]["median"] > 0, phase
    assert red["saturation"]["ratio"]["pps"]["median"] > 0
    assert red["rate_1000"]["r2"]["added_p50_ms"]["median"] is not None
    assert red["duplicates_delivered"]["redundant"] == 0
    assert "server_duplicate_per_datagram" in red["counters"]["r2"]

    for size in ("64", "1200"):  # the floor: bare forwarders in the relay's places, at 1000 pps
        floor = result["floor"][size]
        assert floor["relay_us_per_pkt"]["median"] > 0 and floor["added_p50_ms"]["median"] is not None, size
        assert floor["loss"]["median"] is not None and floor["loss"]["median"] < 1.0, size  # echoes came back
        assert floor["mpudp_minus_floor_us_per_pkt"]["median"] is not None, size

    keys = {t["key"] for t in result["targets"]}
    assert {"ratio_sat_1200", "cpu_sat_1200", "cpu_rate_1200", "added_p50_64", "rss_idle_client_mb",
            "rss_idle_server_mb", "startup_ms", "failover_gap_s", "r2_duplicates"} <= keys
    assert all(isinstance(t["pass"], bool) for t in result["targets"])
