"""Statistics of timed figures: hand-computed percentiles, stdev, CV; raw values kept; n=1 works."""
from __future__ import annotations

import math

import pytest

from qbench.measure import stats


def test_summarize_known_values():
    d = stats.summarize([10, 1, 2, 3, 4, 5, 6, 7, 8, 9], "ms")
    assert d["unit"] == "ms" and d["n"] == 10
    assert d["values"] == [10, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # raw, in measurement order
    assert d["mean"] == 5.5
    # linear interpolation at position (n-1)*q: p50 at 4.5 -> 5.5, p90 at 8.1 -> 9.1, p99 at 8.91 -> 9.91
    assert d["p50"] == pytest.approx(5.5)
    assert d["p90"] == pytest.approx(9.1)
    assert d["p99"] == pytest.approx(9.91)
    # sample variance: sum((x-5.5)^2) = 82.5, / 9
    assert d["stdev"] == pytest.approx(math.sqrt(82.5 / 9))
    assert d["cv"] == pytest.approx(math.sqrt(82.5 / 9) / 5.5)
    assert (d["min"], d["max"]) == (1, 10)


def test_summarize_single_value():
    d = stats.summarize([3.25], "tokens/s")
    assert d["n"] == 1 and d["values"] == [3.25]
    assert d["mean"] == d["p50"] == d["p90"] == d["p99"] == d["min"] == d["max"] == 3.25
    assert d["stdev"] == 0.0 and d["cv"] == 0.0


def test_outlier_is_kept_not_hidden():
    d = stats.summarize([1.0, 1.0, 1.0, 100.0], "ms")
    assert d["max"] == 100.0 and 100.0 in d["values"]
    assert d["mean"] == pytest.approx(25.75)
    assert d["p50"] == 1.0
    assert d["p99"] == pytest.approx(1.0 + 0.97 * 99.0)  # position 2.97 between 1 and 100


def test_zero_mean_and_empty():
    assert stats.summarize([0.0, 0.0], "ms")["cv"] is None
    with pytest.raises(ValueError):
        stats.summarize([], "ms")


def test_cv_warning():
    noisy = stats.summarize([1.0, 2.0], "ms")  # cv = 0.7071/1.5 = 0.471
    assert stats.cv_warning("decode eager bs=1", noisy, 0.05) == "decode eager bs=1: CV 47.1% above 5% (n=2)"
    steady = stats.summarize([100.0, 101.0], "ms")  # cv 0.0070
    assert stats.cv_warning("x", steady, 0.05) is None
    assert stats.cv_warning("x", None, 0.05) is None


def test_median_ci_order_statistics():
    """The distribution-free CI of the median: ranks from the binomial(n, 1/2), as in the textbook tables
    (n=10: 2nd and 9th values; n=20: 6th and 15th; n=100: 40th and 61st)."""
    from qbench.measure.stats import median_ci

    for n, (lo, hi) in {10: (2, 9), 20: (6, 15), 100: (40, 61)}.items():
        ci = median_ci([float(v) for v in range(1, n + 1)])
        assert (ci["low"], ci["high"]) == (lo, hi) and ci["level"] >= 0.95
    small = median_ci([1.0, 2.0, 3.0, 4.0, 5.0])  # no 95 % pair exists below n = 6: [min, max], its own level
    assert (small["low"], small["high"]) == (1.0, 5.0) and small["level"] == pytest.approx(1 - 2 / 32)
    assert median_ci([99.0, 100.0, 100.0, 100.0, 100.0, 101.0])["half_width_pct"] == pytest.approx(1.0)
    assert stats.summarize([1.0, 2.0, 3.0], "ms")["median_ci"]["high"] == 3.0
