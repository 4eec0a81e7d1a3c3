"""Paired statistics between a cell and the baseline cell, scored on the same items.

Quantization moves accuracy by a point or two, less than the spread between two unpaired runs' confidence
intervals. Pairing item by item removes the between-item variance: what is left is the items whose correctness
changed. Everything here is a pure function of two 0/1 correctness vectors (``"0110..."`` strings as stored in
result.json's ``accuracy.items``, or sequences of 0/1 / bools):

- ``delta``: cell accuracy minus baseline accuracy;
- ``ci_low``, ``ci_high``: paired percentile-bootstrap confidence interval of the delta (items resampled with
  replacement, the same resampled items for both cells; fixed seed, so the same inputs give the same interval);
- ``mcnemar_p``: exact McNemar test, two-sided: a binomial test of n_01 successes out of n_01 + n_10 discordant
  items at p = 1/2, p = min(1, 2 * P[X <= min(n_01, n_10)]); 1.0 when no item changed;
- ``flip_rate``: the share of items whose correctness changed, (n_01 + n_10) / n.

``n_01``: items the baseline got wrong and the cell right; ``n_10``: right in the baseline, wrong in the cell.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np

Correctness = Union[str, Sequence[Any], np.ndarray]

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0


def as_correct(values: Correctness) -> np.ndarray:
    """A 0/1 int8 array from a "0110" string or a sequence of 0/1, bools or 0.0/1.0."""
    if isinstance(values, str):
        bad = set(values) - {"0", "1"}
        if bad:
            raise ValueError(f"correctness string holds characters other than 0 and 1: {sorted(bad)[:5]}")
        return np.frombuffer(values.encode("ascii"), dtype=np.uint8).astype(np.int8) - ord("0")
    arr = np.asarray(values, dtype=float).reshape(-1)
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError("correctness values must be 0 or 1")
    return arr.astype(np.int8)


def align(baseline: Correctness, cell: Correctness, baseline_ids: Optional[Sequence[Hashable]] = None,
          cell_ids: Optional[Sequence[Hashable]] = None) -> Tuple[np.ndarray, np.ndarray, List[Hashable]]:
    """The two vectors restricted to the items both have, in the baseline's order.

    Without ids the vectors must already be aligned (same length, same item order).
    """
    b, c = as_correct(baseline), as_correct(cell)
    if baseline_ids is None and cell_ids is None:
        if len(b) != len(c):
            raise ValueError(f"unaligned correctness vectors of {len(b)} and {len(c)} items: give the item ids")
        return b, c, list(range(len(b)))
    if baseline_ids is None or cell_ids is None:
        raise ValueError("give item ids for both cells or for neither")
    baseline_ids, cell_ids = list(baseline_ids), list(cell_ids)
    if len(baseline_ids) != len(b) or len(cell_ids) != len(c):
        raise ValueError("each correctness vector needs one id per item")
    if len(set(baseline_ids)) != len(baseline_ids) or len(set(cell_ids)) != len(cell_ids):
        raise ValueError("item ids repeat")
    where = {i: k for k, i in enumerate(cell_ids)}
    common = [i for i in baseline_ids if i in where]
    bi = [k for k, i in enumerate(baseline_ids) if i in where]
    ci = [where[i] for i in common]
    return b[bi], c[ci], common


def mcnemar_exact(n_01: int, n_10: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant pairs at p = 1/2."""
    if n_01 < 0 or n_10 < 0:
        raise ValueError("discordant counts must be non-negative")
    m = n_01 + n_10
    if m == 0:
        return 1.0
    k = min(n_01, n_10)
    # P[X <= k] for X ~ Binomial(m, 1/2), in exact integers: C(m, i+1) = C(m, i) * (m - i) / (i + 1)
    term, tail = 1, 1
    for i in range(k):
        term = term * (m - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2 ** m)


def bootstrap_delta_ci(n: int, n_01: int, n_10: int, n_resamples: int = DEFAULT_RESAMPLES,
                       seed: int = DEFAULT_SEED, confidence: float = 0.95) -> Tuple[float, float]:
    """Percentile CI of the paired bootstrap of the accuracy delta.

    A paired bootstrap draws n items with replacement and takes mean(cell - baseline) over them. Per item the
    difference is +1 (an n_01 item), -1 (an n_10 item) or 0, so a resample's delta depends only on how many of
    each kind it drew: a multinomial(n; n_01/n, n_10/n, rest) draw. Drawing those counts directly is the same
    distribution as resampling item indices, in O(n_resamples) instead of O(n_resamples * n) memory.
    """
    if n <= 0:
        raise ValueError("no items to compare")
    if not 0 < confidence < 1:
        raise ValueError("confidence must lie between 0 and 1")
    rng = np.random.default_rng(seed)
    p = np.array([n_01, n_10, n - n_01 - n_10], dtype=float) / n
    counts = rng.multinomial(n, p, size=n_resamples)
    deltas = (counts[:, 0] - counts[:, 1]) / n
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(deltas, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_compare(baseline_correct: Correctness, cell_correct: Correctness, *,
                   baseline_ids: Optional[Sequence[Hashable]] = None, cell_ids: Optional[Sequence[Hashable]] = None,
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   confidence: float = 0.95) -> Dict[str, Any]:
    """Paired comparison of a cell against the baseline on the items both scored.

    Returns ``{delta, ci_low, ci_high, mcnemar_p, flip_rate, n, n_01, n_10, baseline_acc, cell_acc,
    confidence, n_resamples, seed, n_baseline_only, n_cell_only}``; ``delta`` = cell - baseline accuracy.
    """
    b, c, _ = align(baseline_correct, cell_correct, baseline_ids, cell_ids)
    n = int(len(b))
    if n == 0:
        raise ValueError("the two cells share no item")
    n_01 = int(np.sum((b == 0) & (c == 1)))
    n_10 = int(np.sum((b == 1) & (c == 0)))
    ci_low, ci_high = bootstrap_delta_ci(n, n_01, n_10, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return {
        "delta": (n_01 - n_10) / n,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "mcnemar_p": mcnemar_exact(n_01, n_10),
        "flip_rate": (n_01 + n_10) / n,
        "n": n,
        "n_01": n_01,
        "n_10": n_10,
        "baseline_acc": float(b.mean()),
        "cell_acc": float(c.mean()),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "n_baseline_only": (len(baseline_ids) - n) if baseline_ids is not None else 0,
        "n_cell_only": (len(cell_ids) - n) if cell_ids is not None else 0,
    }


def compare_items(baseline_items: Dict[str, Any], cell_items: Dict[str, Any], metric: Optional[str] = None,
                  **kwargs: Any) -> Dict[str, Any]:
    """:func:`paired_compare` on two ``accuracy.items[<task>]`` records of result.json, aligned by ``doc_ids``.

    ``metric`` picks one of ``correct_by_metric`` (e.g. "exact_match,flexible-extract" for GSM8K); None = the
    task's primary ``correct``.
    """
    def pick(items: Dict[str, Any]) -> str:
        if metric is None:
            return items["correct"]
        return items["correct_by_metric"][metric]

    return paired_compare(pick(baseline_items), pick(cell_items), baseline_ids=baseline_items.get("doc_ids"),
                          cell_ids=cell_items.get("doc_ids"), **kwargs)
