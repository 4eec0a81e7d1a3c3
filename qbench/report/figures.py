"""A result's figures: the statistics of a timed distribution, and the latency rows, task scores and per-item
records picked out of one result.json."""
from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from qbench.evaluate import tasks as task_table  # stdlib only, like store: the report builds without torch
from qbench.report.loading import ResultLike, accuracy_of, latency_of, memory_of, num, present, typed
from qbench.store.result import (
    DecodeFigure,
    Dist,
    KvShape,
    Precision,
    PrefillFigure,
    SubScore,
    TaskItems,
    TaskScore,
)

_DIST_STATS = ("p50", "mean", "p10", "p90", "p99", "min", "max", "stdev", "cv", "n")


# ---------------------------------------------------------------- distributions


def dist_stats(dist: Any) -> Dict[str, Optional[float]]:
    """The statistics of a Dist (typed, or as stored); p10 (not stored) is computed from the raw values when they
    are there."""
    if isinstance(dist, (int, float)) and not isinstance(dist, bool):
        return {"p50": num(dist)}  # a bare number (e.g. prefill tokens_per_s, "Dist-derived p50")
    if isinstance(dist, dict):
        dist = Dist.from_dict(dist)
    if not isinstance(dist, Dist):
        return {}
    # in _DIST_STATS' order (the tidy table's rows follow it); p10 is no declared field: an older result's own
    out = {"p50": num(dist.p50), "mean": num(dist.mean), "p10": num(dist.extra.get("p10")), "p90": num(dist.p90),
           "p99": num(dist.p99), "min": num(dist.min), "max": num(dist.max), "stdev": num(dist.stdev),
           "cv": num(dist.cv), "n": num(dist.n)}
    values = [v for v in (num(x) for x in dist.values or []) if v is not None]
    if values:
        if out["p10"] is None:
            out["p10"] = float(np.percentile(values, 10))
        if out["p50"] is None:
            out["p50"] = float(np.percentile(values, 50))
        if out["p90"] is None:
            out["p90"] = float(np.percentile(values, 90))
    if out["cv"] is None and out["stdev"] is not None and out["mean"]:
        out["cv"] = out["stdev"] / out["mean"]
    ci = dist.median_ci or None
    out["ci_low"], out["ci_high"] = (num(ci.low), num(ci.high)) if ci else (None, None)
    out["ci_half_width_pct"] = num(ci.half_width_pct) if ci else None
    return {k: v for k, v in out.items() if v is not None}


Figure = Union[PrefillFigure, DecodeFigure]  # a latency row


def precision_of(row: Optional[Figure]) -> Optional[Precision]:
    """A latency row's precision block (how its repeats ended): None for results written before it existed."""
    p = row.precision if row else None
    return p if p and p.to_dict() else None


def capped(row: Optional[Figure]) -> bool:
    """The figure stopped at its time cap before reaching its precision target."""
    p = precision_of(row)
    return p is not None and p.stopped_by == "time_cap"


def central(dist: Any) -> Optional[float]:
    """The figure a table shows for a Dist: the median (robust to a stray slow run), else the mean."""
    s = dist_stats(dist)
    return s.get("p50", s.get("mean"))


# ---------------------------------------------------------------- picking figures out of a result


def weight_bytes(r: ResultLike) -> Optional[float]:
    mem = memory_of(typed(r))
    return (num(mem.weight_bytes_measured) or num(mem.weight_bytes_get_memory_footprint)) if mem else None


def peak_bytes(r: ResultLike) -> tuple[Optional[float], Optional[str]]:
    """Peak memory and where it comes from: the CUDA allocator (max over phases), else process RSS (CPU)."""
    mem = memory_of(typed(r))
    if mem is None:
        return None, None
    phases: Any = mem.peak_allocated_bytes  # older results: one number, not one per phase
    if isinstance(phases, dict):
        vals = [v for v in (num(x) for x in phases.values()) if v is not None]
        if vals:
            return max(vals), "allocator"
    elif num(phases) is not None:
        return num(phases), "allocator"
    rss = num(mem.rss_peak_bytes)
    return (rss, "rss") if rss is not None else (None, None)


def kv_bytes_at_peak(r: ResultLike) -> Optional[float]:
    """Analytic KV cache of the largest measured shape: the one that sets the decode peak."""
    mem = memory_of(typed(r))
    rows = (mem.kv_cache_bytes_analytic or []) if mem else []
    vals = [num(x.bytes) for x in rows if isinstance(x, KvShape)]
    known = [v for v in vals if v is not None]
    return max(known) if known else None


def prefill_rows(r: ResultLike) -> List[PrefillFigure]:
    lat = latency_of(typed(r))
    return [x for x in (lat.prefill or []) if isinstance(x, PrefillFigure)] if lat else []


def decode_rows(r: ResultLike) -> List[DecodeFigure]:
    lat = latency_of(typed(r))
    return [x for x in (lat.decode or []) if isinstance(x, DecodeFigure)] if lat else []


# The decode figure a table leads with: the static (compiled, CUDA-graph) path where a cell measured it, which
# docs/stability.md shows is the one to compare (eager decode on a shared host swings by tens of percent), else
# eager; the other path's figure stands beside it, labelled.
DECODE_PATH_PREFERENCE = ("static", "eager")


def headline_decode(r: ResultLike) -> Optional[DecodeFigure]:
    """The batch-1 decode row a summary shows first for this cell: static where measured, else eager, else any."""
    res = typed(r)
    for path in DECODE_PATH_PREFERENCE:
        row = decode_bs1(res, path)
        if row is not None:
            return row
    return decode_bs1(res, None)


def first_prefill_bs1(r: ResultLike) -> Optional[PrefillFigure]:
    rows = [x for x in prefill_rows(r) if x.batch_size == 1]
    return rows[0] if rows else None


def decode_bs1(r: ResultLike, path: Optional[str]) -> Optional[DecodeFigure]:
    rows = [x for x in decode_rows(r) if x.batch_size == 1 and (path is None or x.decode_path == path)]
    return rows[0] if rows else None


def task_entry(r: ResultLike, task: str) -> Optional[TaskScore]:
    acc = accuracy_of(typed(r))
    t = acc.tasks.get(task) if acc and acc.tasks else None
    return t if isinstance(t, TaskScore) else None


def sweep_tasks(results: Sequence[ResultLike]) -> List[str]:
    """Every task some cell of the sweep evaluated, in the task table's order (then unknown ones, A-Z)."""
    names = {str(k) for acc in (accuracy_of(typed(r)) for r in results) if acc and acc.tasks
             for k, t in acc.tasks.items() if isinstance(t, TaskScore)}
    return task_table.order(sorted(names))


def row_tasks(rows: List[Dict[str, Any]]) -> List[str]:
    """The tasks whose columns the summary rows carry, in column order (each group opens with <task>_metric)."""
    if not rows:
        return []
    row = rows[0]
    return [k[: -len("_metric")] for k in row if k.endswith("_metric")
            and f"{k[: -len('_metric')]}_pct" in row and f"{k[: -len('_metric')]}_delta_source" in row]


TaskLike = Union[TaskScore, Dict[str, Any], None]  # a task's scores, typed or as stored


def task_headline(t: TaskLike, task: Optional[str] = None) -> tuple[Optional[str], Optional[float]]:
    """(metric, score as a fraction) a task is headed by: the task table's headline metric where the entry has
    it (also in results written before the table named it), else the run's own headline (``metric``/``value``),
    else the first number of ``metrics``."""
    if isinstance(t, dict):
        t = TaskScore.from_dict(t) if t else None
    if not t:
        return None, None
    spec = task_table.lookup(task) if task else None
    metrics: Dict[str, Any] = t.metrics if isinstance(t.metrics, dict) else {}
    recorded = t.metric if isinstance(t.metric, str) else None
    if spec is not None:
        if task_table.same_metric(recorded, spec.headline) and num(t.value) is not None:
            return recorded, num(t.value)
        if num(metrics.get(spec.headline)) is not None:
            return spec.headline, num(metrics[spec.headline])
    if num(t.value) is not None:
        return recorded, num(t.value)
    for k, v in metrics.items():
        if num(v) is not None:
            return str(k), num(v)
    return None, None


def task_score(t: TaskLike, task: Optional[str] = None) -> Optional[float]:
    """The task's headline score as a fraction (see :func:`task_headline`)."""
    return task_headline(t, task)[1]


def chance_level(t: Optional[TaskScore], task: str) -> Optional[float]:
    """A random guesser's score: the run's record, else the task table's."""
    recorded = num(t.chance_level) if t else None
    spec = task_table.lookup(task)
    return recorded if recorded is not None else (spec.chance_level if spec else None)


def category_score(v: Any) -> Optional[float]:
    if isinstance(v, SubScore):
        v = v.to_dict()
    if isinstance(v, dict):
        return num(v.get("value", v.get("acc")))
    return num(v)


def task_items(r: ResultLike, task: str, metric: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The task's per-item records with ``correct`` for ``metric`` (default: the run's own headline), or None
    when the cell kept no records of that metric."""
    res = typed(r)
    acc = accuracy_of(res)
    found = acc.items.get(task) if acc and acc.items else None
    if not isinstance(found, TaskItems):
        return None
    it = found.to_dict()
    by_metric: Dict[str, Any] = it["correct_by_metric"] if isinstance(it.get("correct_by_metric"), dict) else {}
    if metric is not None and isinstance(by_metric.get(metric), str):
        return {**it, "correct": by_metric[metric]}
    entry = task_entry(res, task)
    recorded = present(entry.metric) if entry else None  # ``correct`` holds the records of the run's own headline
    if metric is None or recorded is None or task_table.same_metric(metric, recorded):
        return it if isinstance(it.get("correct"), str) else None
    return None


def align_items(base: Dict[str, Any], cell: Dict[str, Any]) -> tuple[str, str]:
    """The two correctness strings restricted to the items both evaluated, in the baseline's order.

    Items are matched by doc_id (a limited or re-ordered evaluation still pairs up); without usable
    doc_ids the strings are paired by position only when they have the same length.
    """
    b_ids, c_ids = base.get("doc_ids"), cell.get("doc_ids")
    b_c, c_c = base["correct"], cell["correct"]
    usable = (isinstance(b_ids, list) and isinstance(c_ids, list) and len(b_ids) == len(b_c)
              and len(c_ids) == len(c_c))
    if usable and b_ids == c_ids:
        return b_c, c_c
    if usable:
        cell_by_id: Dict[str, str] = {}
        for i, ch in zip(c_ids or [], c_c):  # usable: a list
            cell_by_id.setdefault(json.dumps(i, sort_keys=True), ch)
        bs, cs = [], []
        for i, ch in zip(b_ids or [], b_c):
            key = json.dumps(i, sort_keys=True)
            if key in cell_by_id:
                bs.append(ch)
                cs.append(cell_by_id.pop(key))
        return "".join(bs), "".join(cs)
    if len(b_c) == len(c_c):
        return b_c, c_c
    return "", ""


def load_paired_compare() -> Optional[Callable[[str, str], Dict[str, Any]]]:
    """qbench.evaluate.paired.paired_compare, imported lazily; None when that module is not installed.

    The statistics live in one place (qbench/evaluate/paired.py); the report never carries its own copy.
    """
    try:
        return importlib.import_module("qbench.evaluate.paired").paired_compare
    except (ImportError, AttributeError):
        return None

