"""The pure parts of bench/tunnel.py: iperf3 JSON -> figures, the summary, the table, the choices.

No root, no namespaces, no processes: the JSON below has the shape iperf3 3.12 writes
(`-J`), cut down to the keys the bench reads.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import tunnel  # noqa: E402


def interval(start, seconds, nbytes, omitted=False):
    return {"sum": {"start": start, "end": start + seconds, "seconds": seconds, "bytes": nbytes,
                    "omitted": omitted}}


def tcp_json(mbps, received_bytes, intervals, retransmits=3, congestion="cubic"):
    return {"intervals": intervals,
            "end": {"sum_sent": {"bytes": received_bytes, "bits_per_second": mbps * 1e6, "retransmits": retransmits},
                    "sum_received": {"bytes": received_bytes, "bits_per_second": mbps * 1e6},
                    "sender_tcp_congestion": congestion, "receiver_tcp_congestion": "bbr"}}


def udp_json(sent, lost, out_of_order, received_mbps=18.0, sent_mbps=36.0):
    return {"end": {"streams": [{"udp": {"packets": sent, "lost_packets": lost, "out_of_order": out_of_order}}],
                    "sum": {"packets": sent, "lost_packets": lost, "lost_percent": 100.0 * lost / sent,
                            "bits_per_second": sent_mbps * 1e6},
                    "sum_sent": {"bits_per_second": sent_mbps * 1e6},
                    "sum_received": {"packets": sent, "lost_packets": lost, "lost_percent": 100.0 * lost / sent,
                                     "bits_per_second": received_mbps * 1e6}}}


def test_wireguard_mtu_leaves_room_for_mpudp_and_wireguard_on_a_1500_byte_ipv4_path():
    assert tunnel.WG_MTU == 1408
    assert tunnel.WG_MTU + tunnel.WIREGUARD_OVERHEAD + tunnel.MPUDP_OVERHEAD + 28 == 1500


def test_tcp_figures_take_the_receiver_rate_and_count_cpu_over_every_interval():
    report = tcp_json(100.0, 75000000, [interval(0, 1, 10000000, omitted=True), interval(0, 1, 12500000),
                                        interval(1, 1, 12500000)])
    f = tunnel.tcp_figures(report, cpu_s=0.7)
    assert f["mbps"] == pytest.approx(100.0)
    assert f["received_mb"] == pytest.approx(75.0)
    assert f["carried_mb"] == pytest.approx(35.0)  # the omitted second included: the CPU window covers it
    assert f["cpu_ms_per_mb"] == pytest.approx(20.0)
    assert f["retransmits"] == 3
    assert f["congestion"] == "cubic"  # the sender's: the one that sets the pace
    assert tunnel.tcp_figures(report)["cpu_ms_per_mb"] is None  # the direct path: no relay


def test_udp_figures_are_the_receivers_shares_of_the_datagrams_sent():
    f = tunnel.udp_figures(udp_json(sent=1000, lost=250, out_of_order=20), cpu_s=0.15)
    assert f["delivered"] == 750
    assert f["delivered_pct"] == pytest.approx(75.0)
    assert f["out_of_order_pct"] == pytest.approx(2.0)
    assert f["mbps"] == pytest.approx(18.0)
    assert f["sent_mbps"] == pytest.approx(36.0)
    assert f["cpu_us_per_pkt"] == pytest.approx(200.0)


def test_longest_silence_is_the_longest_run_of_empty_intervals():
    intervals = [interval(0.0, 0.1, 500), interval(0.1, 0.1, 0), interval(0.2, 0.1, 300),
                 interval(0.3, 0.1, 0), interval(0.4, 0.1, 0), interval(0.5, 0.1, 0), interval(0.6, 0.1, 90)]
    gap, start = tunnel.longest_silence(intervals)
    assert gap == pytest.approx(0.3)
    assert start == pytest.approx(0.3)
    assert tunnel.longest_silence([interval(0, 0.1, 1)]) == (0.0, None)
    assert tunnel.longest_silence([]) == (0.0, None)


def test_a_silence_that_lasts_to_the_end_counts():
    gap, start = tunnel.longest_silence([interval(0.0, 0.1, 5), interval(0.1, 0.1, 0), interval(0.2, 0.05, 0)])
    assert gap == pytest.approx(0.15)
    assert start == pytest.approx(0.1)


def test_blackhole_figures():
    report = tcp_json(10.0, 9000000, [interval(0.0, 0.1, 5), interval(0.1, 0.1, 0), interval(0.2, 0.1, 7)])
    f = tunnel.blackhole_figures(report, 4.01, 1)
    assert f["gap_s"] == pytest.approx(0.1)
    assert f["total_mb"] == pytest.approx(9.0)
    assert (f["link"], f["blackholed_at_s"]) == (1, 4.01)


def test_iperf_error_says_why_there_is_no_result():
    assert tunnel.iperf_error({"error": "unable to connect to server"}) == "unable to connect to server"
    assert tunnel.iperf_error({"start": {}}) == "no end.sum_received"
    assert tunnel.iperf_error([]) == "no JSON object"
    assert tunnel.iperf_error(tcp_json(1.0, 1, [])) is None


def test_summary_takes_medians_and_the_aggregate_ratio_per_repetition():
    raw = {"equal": {"tcp_up": {
        "direct": [{"mbps": 18.0, "cpu_ms_per_mb": None}] * 3,
        "mpudp": [{"mbps": 18.0, "cpu_ms_per_mb": 80.0}, {"mbps": 17.0, "cpu_ms_per_mb": 90.0},
                  {"error": "iperf3 did not finish"}],
        "mpudp-aggregate": [{"mbps": 36.0, "cpu_ms_per_mb": 80.0}, {"mbps": 34.0, "cpu_ms_per_mb": 99.0},
                            {"mbps": 30.0, "cpu_ms_per_mb": 85.0}]}}}
    figures = tunnel.summarize(raw)["equal"]["tcp_up"]
    assert figures["mbps"]["mpudp-aggregate"]["median"] == 34.0
    assert figures["mbps"]["mpudp"]["median"] == 17.5  # two runs: the failed one is left out
    ratios = figures["mbps"]["agg_over_ab"]
    assert ratios["runs"] == [2.0, 2.0, None]  # per repetition, then the median
    assert (ratios["median"], ratios["min"], ratios["max"]) == (2.0, 2.0, 2.0)
    assert figures["cpu_ms_per_mb"]["direct"]["median"] is None


def test_summary_has_no_ratio_without_both_mpudp_paths():
    raw = {"unshaped": {"tcp_down": {"direct": [{"mbps": 300.0}], "mpudp": [{"mbps": 350.0}]}}}
    assert "agg_over_ab" not in tunnel.summarize(raw)["unshaped"]["tcp_down"]["mbps"]


def sample_result(paths, raw, unsupported=None):
    return {"date": "2026-12-03", "quick": True, "elapsed_s": 60,
            "machine": {"cpu_model": "cpu", "cores": 2, "kernel": "6", "python": "3.11"},
            "tools": {"wireguard-go": "wireguard-go v0", "iperf3": "iperf 3.12"},
            "mpudp": {"path": "/x/mpudp.py", "sha256": "ab" * 32, "git": {"commit": "c" * 40,
                                                                          "mpudp_py_modified": False}},
            "params": {"repeat": 1, "wg_mtu": 1408, "burst_ms": 2, "queue_ms": 50, "seconds": 3},
            "paths": paths, "unsupported": unsupported or {}, "notes": [],
            "scenarios": {name: tunnel.SCENARIOS[name] for name in raw},
            "figures": tunnel.summarize(raw)}


def test_table_has_paths_as_columns_and_marks_what_was_not_measured():
    raw = {"blackhole": {"blackhole": {"mpudp": [{"gap_s": 0.5, "total_mb": 10.0}]}},
           "equal": {"tcp_up": {"direct": [{"mbps": 18.3, "cpu_ms_per_mb": None}],
                                "mpudp": [{"mbps": 17.9, "cpu_ms_per_mb": 80.4}]}}}
    text = tunnel.render(sample_result(["direct", "mpudp", "mpudp-aggregate"], raw,
                                       {"mpudp-aggregate": "client.aggregate: unknown key"}))
    lines = text.splitlines()
    header = [line for line in lines if line.split()[:3] == ["direct", "mpudp", "mpudp-aggregate"]]
    assert header and "agg/ab" in header[0]
    gap = [line for line in lines if "longest gap" in line][0]
    assert gap.split()[5:8] == ["n/a", "0.5", "not"]  # direct has no blackhole run; aggregate is not supported
    assert "17.9" in [line for line in lines if "TCP up  Mbit/s" in line][0]
    assert "mpudp-aggregate: not supported by this mpudp.py (client.aggregate: unknown key)" in text


@pytest.mark.parametrize("asked, reported, said", [
    (None, ["bbr", "bbr"], "congestion control bbr (the system's default)"),
    ("cubic", ["cubic"], "congestion control cubic"),
    (None, [None], "congestion control not reported (the system's default)"),  # a saved run from before
])
def test_table_says_which_congestion_control_the_tcp_senders_used(asked, reported, said):
    raw = {"equal": {"tcp_up": {"mpudp": [dict({"mbps": 17.9, "cpu_ms_per_mb": 80.4},
                                               **({"congestion": c} if c else {})) for c in reported]}}}
    result = dict(sample_result(["mpudp"], raw), runs=raw)
    result["params"]["congestion"] = asked
    assert said in tunnel.render(result)
    assert tunnel.parse_args([]).congestion == "cubic"  # what most senders use, whatever this machine says
    assert tunnel.parse_args(["--congestion", "bbr"]).congestion == "bbr"


def test_aggregate_verdict_from_check():
    assert tunnel.aggregate_verdict(0, "") is None
    assert tunnel.aggregate_verdict(0, "mpudp: warning: client.aggregate: unknown key\n") == \
        "mpudp: warning: client.aggregate: unknown key"
    assert tunnel.aggregate_verdict(2, "mpudp: config error: client.aggregate: not a key\n") == \
        "mpudp: config error: client.aggregate: not a key"
    assert tunnel.aggregate_verdict(2, "something else\n") == "config error (exit 2)"


def test_scenario_and_path_choices():
    def error(message):
        raise ValueError(message)

    assert tunnel.choose_scenarios(None, error) == list(tunnel.SCENARIOS)
    assert tunnel.choose_scenarios(["equal", "unshaped"], error) == ["unshaped", "equal"]
    assert tunnel.choose_scenarios(["udp", "all"], error) == list(tunnel.SCENARIOS)
    with pytest.raises(ValueError):
        tunnel.choose_scenarios(["nope"], error)
    assert tunnel.choose_paths("mpudp,direct", False, error) == ["direct", "mpudp"]
    assert tunnel.choose_paths(",".join(tunnel.PATHS), False, error) == ["direct", "mpudp", "mpudp-aggregate"]
    assert tunnel.choose_paths(",".join(tunnel.PATHS), True, error) == list(tunnel.PATHS)
    with pytest.raises(ValueError):
        tunnel.choose_paths("direct,floor", True, error)


def test_every_scenario_names_known_tests_and_the_udp_rate_has_a_link_rate():
    for name, spec in tunnel.SCENARIOS.items():
        assert spec["links"], name
        assert all(test in tunnel.TESTS_RUN for test in spec["tests"]), name
        if "udp" in spec["tests"] or "blackhole" in spec["tests"]:
            assert spec["links"][0]["mbit"], name  # shaped: a rate to exceed, a queue to blackhole


@pytest.mark.parametrize("scenario, expected", [("unequal", [0.0, tunnel.BEST_LINK_MARGIN]),
                                                ("equal", [0.0, 0.0]), ("unshaped", [0.0])])
def test_active_backup_is_measured_on_the_fastest_link(scenario, expected):
    """The aggregate figures are against active-backup on the best link: the slower links
    get a priority that keeps the relay off them (an unshaped link is the fastest)."""
    topo = type("Topo", (), {"links": tunnel.SCENARIOS[scenario]["links"]})()
    assert tunnel.Relays(None, topo, []).priorities() == expected
