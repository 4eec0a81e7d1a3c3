"""Distributions of timed figures (the ``Dist`` of docs/results.md).

Every timed figure keeps its raw values: nothing here drops or clips outliers, so a slow run stays visible in
``max`` / ``p99`` and in ``values`` for anyone who wants to look again.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional


def percentile(sorted_values: List[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks.

    Same definition as numpy's default ("linear", Hyndman & Fan type 7), so figures can be checked by hand:
    position = (n - 1) * q / 100, interpolated between the two neighbouring sorted values.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def median_ci(sorted_values: List[float], level: float = 0.95) -> Dict[str, Any]:
    """Distribution-free confidence interval of the median from order statistics (no normality assumed):
    [x_(j), x_(n-j+1)] with the largest j whose coverage 1 - 2 * P(Binomial(n, 1/2) < j) is still >= level.

    Below n = 6 no pair of order statistics reaches 95 %: the interval is then [min, max] and ``level`` says
    the coverage it really has (n = 5: 93.8 %), so the figure is honest rather than missing. Returns
    ``{"low", "high", "level", "half_width_pct"}``; half_width_pct is half the interval in % of the median.
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("median_ci of no values")
    def coverage(j: int) -> float:  # of [x_(j), x_(n-j+1)]: 1 - 2 P(B <= j - 1), B ~ Binomial(n, 1/2)
        return 1.0 - 2.0 * math.fsum(math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                                              - n * math.log(2.0)) for k in range(j))

    # start near the normal approximation's rank (n/2 - 0.98 sqrt(n)), then walk to the exact one
    j = max(1, int((n - 1.96 * math.sqrt(n)) / 2) - 1)
    while j > 1 and coverage(j) < level:
        j -= 1
    while 2 * (j + 1) <= n + 1 and coverage(j + 1) >= level:
        j += 1
    coverage_j = coverage(j) if n > 1 else 0.0
    low, high = sorted_values[j - 1], sorted_values[n - j]
    med = percentile(sorted_values, 50)
    return {"low": low, "high": high, "level": coverage_j,
            "half_width_pct": 100.0 * (high - low) / 2.0 / abs(med) if med else None}


def summarize(values: Iterable[float], unit: str) -> Dict[str, Any]:
    """A Dist: unit, n, raw values (in measurement order), mean, p50, p90, p99, stdev, cv, min, max, and
    ``median_ci`` (the 95 % CI of the median, :func:`median_ci`).

    ``stdev`` is the sample standard deviation (n - 1 in the denominator), 0.0 for a single value;
    ``cv`` = stdev / mean (null when the mean is 0).
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize: no values (a figure with no measurement is null, not an empty Dist)")
    n = len(vals)
    ordered = sorted(vals)
    mean = math.fsum(vals) / n
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {
        "unit": unit,
        "n": n,
        "values": vals,
        "mean": mean,
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "stdev": stdev,
        "cv": (stdev / mean) if mean != 0 else None,
        "min": ordered[0],
        "max": ordered[-1],
        "median_ci": median_ci(ordered),
    }


def cv_warning(label: str, dist: Optional[Dict[str, Any]], threshold: float) -> Optional[str]:
    """A warning line when the figure's CV is above ``threshold`` (e.g. 0.05), else None."""
    if dist is None or dist.get("cv") is None or threshold is None:
        return None
    if dist["cv"] > threshold:
        return f"{label}: CV {dist['cv'] * 100:.1f}% above {threshold * 100:.0f}% (n={dist['n']})"
    return None
