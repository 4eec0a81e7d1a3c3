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


def summarize(values: Iterable[float], unit: str) -> Dict[str, Any]:
    """A Dist: unit, n, raw values (in measurement order), mean, p50, p90, p99, stdev, cv, min, max.

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
    }


def cv_warning(label: str, dist: Optional[Dict[str, Any]], threshold: float) -> Optional[str]:
    """A warning line when the figure's CV is above ``threshold`` (e.g. 0.05), else None."""
    if dist is None or dist.get("cv") is None or threshold is None:
        return None
    if dist["cv"] > threshold:
        return f"{label}: CV {dist['cv'] * 100:.1f}% above {threshold * 100:.0f}% (n={dist['n']})"
    return None
