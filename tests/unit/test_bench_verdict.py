"""The benchmarks' verdict rule (bench/verdict.py) on fixed numbers: pair order, median of pair ratios, noise."""

import pytest

from bench import verdict
from bench.verdict import HIGHER, LOWER, decide, interleaved, label, pair_order, pair_ratios

# (baseline, virtbroker) seconds of five pairs: ratios 0.9, 1.0, 1.1, 0.95, 1.2
STORM_PAIRS = [(10.0, 9.0), (4.0, 4.0), (5.0, 5.5), (2.0, 1.9), (5.0, 6.0)]


def test_order_flips_each_pair():
    assert pair_order(0, ["libvirt", "virtbroker"]) == ["libvirt", "virtbroker"]
    assert pair_order(1, ["libvirt", "virtbroker"]) == ["virtbroker", "libvirt"]
    assert pair_order(2, ["libvirt", "virtbroker"]) == ["libvirt", "virtbroker"]
    runs = list(interleaved(4, ["b", "v"]))
    assert runs == [(0, "b"), (0, "v"), (1, "v"), (1, "b"), (2, "b"), (2, "v"), (3, "v"), (3, "b")]


def test_order_keeps_neighbours_next_to_each_other_with_more_ways():
    ways = ["baseline", "judged", "reference"]
    assert pair_order(1, ways) == ["reference", "judged", "baseline"]
    for index in range(4):
        order = pair_order(index, ways)
        assert abs(order.index("baseline") - order.index("judged")) == 1


def test_pair_ratios_are_subject_over_baseline_and_skip_incomplete_pairs():
    assert pair_ratios(STORM_PAIRS) == pytest.approx([0.9, 1.0, 1.1, 0.95, 1.2])
    assert pair_ratios([(2.0, 1.0), (None, 1.0), (1.0, None), (0.0, 3.0)]) == [0.5]


def test_median_of_pair_ratios_not_ratio_of_medians():
    t = decide("start", pair_ratios(STORM_PAIRS), 1.05, LOWER)
    assert t["median"] == pytest.approx(1.0)
    assert (t["min"], t["max"]) == (pytest.approx(0.9), pytest.approx(1.2))
    assert t["count"] == 5
    # The ratio of the two sides' medians would be 5.5 / 5.0 = 1.1: a miss the pairs do not show.
    assert t["met"] is True and t["verdict"] == "met"


def test_lower_is_better_met_missed_and_within_noise():
    clear_met = decide("x", [0.80, 0.85, 0.9, 0.95, 1.0], 1.05, LOWER)
    assert clear_met["met"] is True and clear_met["within_noise"] is False
    assert label(clear_met) == "met"
    clear_miss = decide("x", [1.1, 1.2, 1.3, 1.4, 1.5], 1.05, LOWER)
    assert clear_miss["met"] is False and clear_miss["within_noise"] is False
    assert label(clear_miss) == "**missed**"
    noisy_met = decide("x", pair_ratios(STORM_PAIRS), 1.05, LOWER)
    assert noisy_met["met"] is True and noisy_met["within_noise"] is True
    assert label(noisy_met) == "met, within noise"
    noisy_miss = decide("x", [1.0, 1.1, 1.1, 1.2, 1.3], 1.05, LOWER)
    assert noisy_miss["met"] is False and noisy_miss["within_noise"] is True
    assert label(noisy_miss) == "**missed**, within noise"


def test_higher_is_better_met_missed_and_within_noise():
    rates = [12000.0, 11000.0, 10500.0, 13000.0, 10100.0]
    assert decide("jobs", rates, 10000, HIGHER, fmt="{:,.0f} /s")["verdict"] == "met"
    assert decide("jobs", rates, 10000, HIGHER)["within_noise"] is False
    noisy = decide("jobs", [9000.0, 9500.0, 10200.0, 10400.0, 11000.0], 10000, HIGHER)
    assert noisy["median"] == 10200.0 and noisy["met"] is True and noisy["within_noise"] is True
    missed = decide("jobs", [9000.0, 9500.0, 9800.0, 10400.0, 11000.0], 10000, HIGHER)
    assert missed["met"] is False and missed["within_noise"] is True
    below = decide("jobs", [0.20, 0.21, 0.22, 0.23, 0.24], 0.25, HIGHER)
    assert below["met"] is False and below["within_noise"] is False
    assert below["limit"] == ">= 0.25x"


def test_a_value_at_the_limit_meets_it():
    at_limit = decide("x", [1.05] * 5, 1.05, LOWER)
    assert at_limit["met"] is True and at_limit["within_noise"] is False
    touching = decide("x", [1.05, 1.1, 1.1, 1.2, 1.2], 1.05, LOWER)
    assert touching["met"] is False and touching["within_noise"] is True
    assert decide("x", [0.8] * 5, 0.8, HIGHER)["met"] is True


def test_fewer_than_five_pairs_is_not_judged_but_shown():
    t = decide("x", [0.9, 1.0], 1.05, LOWER)
    assert t["met"] is None and t["verdict"] == "not judged"
    assert t["median"] == pytest.approx(0.95) and t["min"] == 0.9 and t["max"] == 1.0
    assert label(t) == "not judged (2 of 5 pairs; the median meets the limit)"
    assert verdict.MIN_PAIRS == 5


def test_failed_runs_are_dropped_and_nothing_is_not_measured():
    t = decide("x", [None, 1.0, 1.0, 1.0, 1.0, 1.0], 1.05, LOWER)
    assert t["count"] == 5 and t["met"] is True
    empty = decide("x", [None, None], 1.05, LOWER)
    assert empty["verdict"] == "not measured" and empty["median"] is None
    assert label(empty) == "not measured"


def test_max_statistic_and_further_conditions():
    takeovers = [1.8, 1.9, 2.0, 2.1, 4.5]
    worst = decide("takeover max", takeovers, 4.0, LOWER, fmt="{:.2f} s", statistic="max")
    assert worst["met"] is False and worst["within_noise"] is False
    assert verdict.figures(worst) == ("4.50 s", "1.80 s to 4.50 s")
    dac = decide("dac", [0.9] * 5, 1.0, LOWER, requires=[("base restored", True), ("roots enforced", False)])
    assert dac["met"] is False


def test_unjudged_reason_wins():
    t = decide("x", [0.5] * 5, 1.0, LOWER, unjudged="measured at N=8, not 20")
    assert t["met"] is None and label(t).startswith("not judged (measured at N=8, not 20;")


def test_figures_use_the_targets_format():
    t = decide("jobs", [9000.0, 10000.0, 11000.0, 12000.0, 13000.0], 10000, HIGHER, fmt="{:,.0f} /s")
    assert verdict.figures(t) == ("11,000 /s", "9,000 /s to 13,000 /s")
    assert t["limit"] == ">= 10,000 /s"
