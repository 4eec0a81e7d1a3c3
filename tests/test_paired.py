"""Paired statistics (qbench/evaluate/paired.py) on correctness vectors whose answers are worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qbench.evaluate.paired import as_correct, bootstrap_delta_ci, compare_items, mcnemar_exact, paired_compare

# baseline right on items 0-3 and 8, the cell loses items 2, 3 (n_10 = 2) and gains 4, 5, 6 (n_01 = 3)
BASE = "1111000010"
CELL = "1100111010"


def test_counts_delta_and_flip_rate_by_hand():
    r = paired_compare(BASE, CELL)
    assert (r["n"], r["n_01"], r["n_10"]) == (10, 3, 2)
    assert r["baseline_acc"] == pytest.approx(0.5)
    assert r["cell_acc"] == pytest.approx(0.6)
    assert r["delta"] == pytest.approx(0.1)
    assert r["flip_rate"] == pytest.approx(0.5)
    # 5 discordant items, min(3, 2) = 2: P[X <= 2] = (1 + 5 + 10) / 32 = 1/2, two-sided -> 1.0
    assert r["mcnemar_p"] == 1.0


@pytest.mark.parametrize("n_01,n_10,expected", [
    (0, 0, 1.0),                # nothing changed
    (0, 10, 2 / 1024),          # all 10 discordant one way: 2 * 0.5**10
    (1, 9, 2 * 11 / 1024),      # 2 * (C(10,0) + C(10,1)) / 2**10
    (9, 1, 2 * 11 / 1024),      # symmetric
    (2, 3, 1.0),                # 2 * 16/32 capped at 1
    (0, 1, 1.0),                # 2 * 1/2
    (3, 12, 2 * (1 + 15 + 105 + 455) / 2 ** 15),
])
def test_mcnemar_exact_known_values(n_01, n_10, expected):
    assert mcnemar_exact(n_01, n_10) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for n_01, n_10 in [(5, 17), (40, 61), (0, 3), (250, 310), (7, 7)]:
        ref = stats.binomtest(n_01, n_01 + n_10, 0.5, alternative="two-sided").pvalue
        assert mcnemar_exact(n_01, n_10) == pytest.approx(ref, rel=1e-9)


def test_mcnemar_large_counts_do_not_overflow():
    p = mcnemar_exact(5000, 5400)
    assert 0 < p < 1e-3 and math.isfinite(p)


def test_ci_contains_delta_and_is_deterministic_for_a_seed():
    rng = np.random.default_rng(7)
    base = (rng.random(500) < 0.6).astype(int)
    cell = base.copy()
    flip = rng.choice(500, 60, replace=False)
    cell[flip] = 1 - cell[flip]
    a = paired_compare(base, cell, seed=3)
    b = paired_compare(list(base), list(cell), seed=3)
    assert a == b
    assert a["ci_low"] <= a["delta"] <= a["ci_high"]
    assert a["ci_low"] < a["ci_high"]
    assert (a["seed"], a["n_resamples"], a["confidence"]) == (3, 10_000, 0.95)
    # the interval is a bootstrap estimate: another seed moves it by at most a couple of grid steps (1/500)
    c = paired_compare(base, cell, seed=4)
    assert c["delta"] == a["delta"]
    assert abs(c["ci_low"] - a["ci_low"]) <= 0.004 and abs(c["ci_high"] - a["ci_high"]) <= 0.004


def test_identical_cells_have_a_zero_width_interval():
    r = paired_compare("0110100111", "0110100111")
    assert (r["delta"], r["ci_low"], r["ci_high"], r["flip_rate"], r["mcnemar_p"]) == (0.0, 0.0, 0.0, 0.0, 1.0)


def test_count_bootstrap_matches_index_resampling():
    """The multinomial shortcut has the distribution of resampling item indices: compare with the slow way."""
    rng = np.random.default_rng(11)
    base = (rng.random(300) < 0.55).astype(int)
    cell = base.copy()
    idx = rng.choice(300, 45, replace=False)
    cell[idx] = 1 - cell[idx]
    d = cell - base
    boot = np.random.default_rng(5)
    slow = np.array([d[boot.integers(0, 300, 300)].mean() for _ in range(10_000)])
    slow_lo, slow_hi = np.quantile(slow, [0.025, 0.975])
    n_01, n_10 = int(((base == 0) & (cell == 1)).sum()), int(((base == 1) & (cell == 0)).sum())
    lo, hi = bootstrap_delta_ci(300, n_01, n_10, n_resamples=10_000, seed=0)
    assert lo == pytest.approx(slow_lo, abs=0.006)
    assert hi == pytest.approx(slow_hi, abs=0.006)
    # and the normal approximation of a paired difference agrees roughly
    se = d.std(ddof=0) / math.sqrt(300)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_alignment_by_item_id_ignores_order_and_unshared_items():
    ids = [f"anatomy/{i}" for i in range(10)]
    order = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    shuffled_ids = [ids[i] for i in order] + ["virology/0"]
    shuffled = "".join(CELL[i] for i in order) + "1"
    r = paired_compare(BASE, shuffled, baseline_ids=ids, cell_ids=shuffled_ids)
    ref = paired_compare(BASE, CELL)
    for key in ("delta", "ci_low", "ci_high", "mcnemar_p", "flip_rate", "n", "n_01", "n_10"):
        assert r[key] == ref[key], key
    assert r["n_cell_only"] == 1 and r["n_baseline_only"] == 0


def test_compare_items_reads_result_json_records():
    base = {"doc_ids": [0, 1, 2, 3], "correct": "1100",
            "correct_by_metric": {"exact_match,strict-match": "1100", "exact_match,flexible-extract": "1110"}}
    cell = {"doc_ids": [0, 1, 2, 3], "correct": "1000",
            "correct_by_metric": {"exact_match,strict-match": "1000", "exact_match,flexible-extract": "1111"}}
    assert compare_items(base, cell)["delta"] == pytest.approx(-0.25)
    assert compare_items(base, cell, metric="exact_match,flexible-extract")["delta"] == pytest.approx(0.25)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        paired_compare("0101", "010")  # unaligned, no ids
    with pytest.raises(ValueError):
        as_correct("01x1")
    with pytest.raises(ValueError):
        as_correct([0, 1, 2])
    with pytest.raises(ValueError):
        paired_compare("01", "10", baseline_ids=["a", "b"], cell_ids=["c", "d"])  # nothing shared
    assert list(as_correct("0110")) == [0, 1, 1, 0]
    assert list(as_correct([True, False, 1.0])) == [1, 0, 1]
