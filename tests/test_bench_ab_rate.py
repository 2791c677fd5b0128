"""bench/ab_rate.py's arithmetic: ratios and differences are taken per repetition, then
summarized (the figures themselves come from bench.py's load generator)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import pytest  # noqa: E402

import ab_rate  # noqa: E402


def test_spread_is_median_min_max_of_what_was_measured():
    assert ab_rate.spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [1.0, 2.0, 3.0]}
    assert ab_rate.spread([4.0, 1.0])["median"] == 2.5
    assert ab_rate.spread([None]) is None


def test_ratios_and_differences_are_per_repetition(tmp_path):
    old, new = tmp_path / "old.py", tmp_path / "new.py"
    old.write_text("old")
    new.write_text("new")
    args = argparse.Namespace(rate=1000, seconds=2.0, reps=2, pin=False, python=sys.executable,
                              mpudp=[("old", str(old)), ("new", str(new))], sizes=list(ab_rate.SIZES),
                              client={"new": {"aggregate": True}})
    runs = {}
    for size in ab_rate.SIZES:
        runs[(size, "direct")] = [{"p50_ms": 0.05}, {"p50_ms": 0.10}]
        runs[(size, "floor")] = [{"cpu_us": 100.0, "p50_ms": 0.15}, {"cpu_us": 200.0, "p50_ms": 0.20}]
        runs[(size, "go")] = [{"cpu_us": 150.0, "p50_ms": 0.25}, {"cpu_us": 300.0, "p50_ms": 0.30}]
        runs[(size, "old")] = [{"cpu_us": 160.0, "p50_ms": 0.25}, {"cpu_us": 320.0, "p50_ms": 0.30}]
        runs[(size, "new")] = [{"cpu_us": 120.0, "p50_ms": 0.15}, {"cpu_us": 160.0, "p50_ms": None}]
    result = ab_rate.summarize(args, ["floor", "go", "old", "new"], runs)
    row = result["sizes"]["64"]["new"]
    # A faster repetition does not pair with a slower one's figure: 120/160 and 160/320.
    assert row["over_first"]["runs"] == pytest.approx([0.5, 0.75])
    assert row["minus_floor_us"]["runs"] == pytest.approx([-40.0, 20.0])
    assert row["over_go"]["runs"] == pytest.approx(sorted([120 / 150, 160 / 300]))
    # Added latency is each path's p50 minus the direct path's p50 of the same repetition.
    assert row["added_p50_ms"]["runs"] == pytest.approx([0.10])  # the second has no p50
    assert row["p50_over_go"]["runs"] == pytest.approx([0.5])
    assert "over_first" not in result["sizes"]["64"]["floor"]
    assert result["mpudp"]["old"]["sha256"] != result["mpudp"]["new"]["sha256"]
    assert result["mpudp"]["new"]["client"] == {"aggregate": True} and "client" not in result["mpudp"]["old"]


def test_client_keys_go_to_the_variant_named_and_bad_ones_are_refused():
    parser = argparse.ArgumentParser()
    extras = ab_rate.parse_client_extras(['agg={"aggregate": true}', 'agg={"redundancy": 1}'], ["ab", "agg"], parser)
    assert extras == {"agg": {"aggregate": True, "redundancy": 1}}
    for bad in ['other={"aggregate": true}', "agg={not json", "agg=[1]"]:
        with pytest.raises(SystemExit) as info:
            ab_rate.parse_client_extras([bad], ["ab", "agg"], parser)
        assert info.value.code == 2
