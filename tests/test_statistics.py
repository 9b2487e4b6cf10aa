"""harness.reports.statistics against independent formulas (numpy, scipy's distributions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.reports.statistics import compare_with_best, interval_text, p_value_text, paired_test, t_interval


def test_t_interval__matches_scipy_and_the_textbook_formula() -> None:
    values = [71.2, 73.9, 72.4, 70.8, 74.1]
    interval = t_interval(values)
    mean = np.mean(values)
    sem = np.std(values, ddof=1) / math.sqrt(len(values))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem)
    assert interval.mean == pytest.approx(mean)
    assert (interval.low, interval.high) == pytest.approx((low, high))
    # Textbook: t(0.975, 4) = 2.7764451 (tables), so the half-width is 2.776 * s / sqrt(5).
    assert interval.half_width == pytest.approx(2.7764451 * np.std(values, ddof=1) / math.sqrt(5), rel=1e-6)
    assert interval.n == 5 and interval.n_nonfinite == 0 and interval.method == "Student t-interval"


def test_t_interval__other_confidence_and_known_small_case() -> None:
    # n = 2: t(0.95, 1) = 6.3137515; values 1 and 3 -> s = sqrt(2), sem = 1.
    interval = t_interval([1.0, 3.0], confidence=0.90)
    assert (interval.low, interval.high) == pytest.approx((2 - 6.3137515, 2 + 6.3137515), rel=1e-6)


def test_t_interval__one_value_has_no_interval_and_nan_is_counted() -> None:
    interval = t_interval([0.8, math.nan, math.inf])
    assert interval.mean == 0.8 and interval.n == 1 and interval.n_nonfinite == 2
    assert not interval.exists and math.isnan(interval.half_width)
    assert interval_text(interval, 1) == "0.8 (1 nan, 1 inf)"  # each kind named (issue 13)
    empty = t_interval([math.nan])
    assert math.isnan(empty.mean) and interval_text(empty, 1) == "—"
    # Every seed at the same infinity is that value, not a missing one; a mix has no mean.
    assert interval_text(t_interval([math.inf, math.inf]), 1) == "inf"
    assert interval_text(t_interval([-math.inf]), 1) == "-inf"
    assert interval_text(t_interval([math.inf, -math.inf]), 1) == "—"


def test_t_interval__identical_values_give_a_point_interval() -> None:
    interval = t_interval([5.0, 5.0, 5.0])
    assert interval.low == interval.high == 5.0
    assert interval_text(interval, 2) == "5.00 ± 0.00"


def test_t_interval__bad_confidence_is_an_error() -> None:
    with pytest.raises(ValueError, match="confidence must be in"):
        t_interval([1.0, 2.0], confidence=95)


def test_paired_test__matches_the_formula_over_shared_seeds_only() -> None:
    best = {0: 80.0, 1: 82.5, 2: 79.0, 3: 81.0, 9: 10.0}
    other = {0: 78.0, 1: 82.0, 2: 77.5, 3: 80.0, 7: 99.0, 4: math.nan}
    test = paired_test(best, other)
    assert test is not None and test.n == 4
    difference = np.array([78.0 - 80.0, 82.0 - 82.5, 77.5 - 79.0, 80.0 - 81.0])
    t = difference.mean() / (difference.std(ddof=1) / math.sqrt(4))
    assert test.statistic == pytest.approx(t)
    assert test.p_value == pytest.approx(2 * stats.t.sf(abs(t), 3))
    assert test.mean_difference == pytest.approx(difference.mean())


def test_paired_test__fewer_than_two_shared_seeds_and_constant_differences() -> None:
    assert paired_test({0: 1.0, 1: 2.0}, {1: 3.0, 2: 4.0}) is None
    same = paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same is not None and same.p_value == 1.0 and same.statistic == 0.0
    shifted = paired_test({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})
    assert shifted is not None and shifted.p_value == 0.0 and shifted.statistic == -math.inf


def test_compare_with_best__ties_losers_untested_and_baselines() -> None:
    samples = {
        # best mean 80.75
        "a": {0: 80.0, 1: 82.0, 2: 79.0, 3: 82.0},
        # noisy differences around -0.25: not distinguishable from a
        "b": {0: 81.5, 1: 80.0, 2: 80.0, 3: 80.5},
        # consistently ~5 points lower: a loss
        "c": {0: 75.0, 1: 77.2, 2: 74.1, 3: 76.9},
        # one shared seed: no test
        "d": {0: 70.0, 5: 90.0},
        # a baseline that beats everyone is not a candidate
        "ref": {0: 99.0, 1: 99.0},
    }
    verdicts = compare_with_best(samples, higher_is_better=True, candidates=["a", "b", "c", "d"])
    assert set(verdicts) == {"a", "b", "c", "d"}
    assert verdicts["a"].status == "best"
    assert verdicts["b"].status == "tie"
    assert verdicts["b"].test is not None and verdicts["b"].test.p_value >= 0.05
    assert verdicts["c"].status == "worse"
    assert verdicts["c"].test is not None and verdicts["c"].test.p_value < 0.05
    assert verdicts["d"].status == "untested"
    expected_p = stats.ttest_rel([75.0, 77.2, 74.1, 76.9], [80.0, 82.0, 79.0, 82.0]).pvalue
    assert verdicts["c"].test.p_value == pytest.approx(expected_p)


def test_compare_with_best__lower_is_better_equal_bests_and_a_single_candidate() -> None:
    verdicts = compare_with_best({"x": {0: 1.0, 1: 1.0}, "y": {0: 1.0, 1: 1.0}, "z": {0: 3.0, 1: 3.2}}, higher_is_better=False)
    assert verdicts["x"].status == verdicts["y"].status == "best"
    assert verdicts["z"].status == "worse"
    assert compare_with_best({"x": {0: 1.0}, "y": {0: math.nan}}, higher_is_better=True) == {}


def test_p_value_text__formats() -> None:
    assert p_value_text(0.0004) == "< 0.001"
    assert p_value_text(0.0123) == "0.012"
    assert p_value_text(0.456) == "0.46"
    assert p_value_text(math.nan) == "–"
