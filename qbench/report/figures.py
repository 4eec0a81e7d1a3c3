"""A result's figures: the statistics of a timed distribution, and the latency rows, task scores and per-item
records picked out of one result.json."""
from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from qbench.evaluate import tasks as task_table  # stdlib only, like store: the report builds without torch
from qbench.report.loading import get, num

_DIST_STATS = ("p50", "mean", "p10", "p90", "p99", "min", "max", "stdev", "cv", "n")


# ---------------------------------------------------------------- distributions


def dist_stats(dist: Any) -> Dict[str, Optional[float]]:
    """The statistics of a Dist; p10 (not stored) is computed from the raw values when they are there."""
    if isinstance(dist, (int, float)) and not isinstance(dist, bool):
        return {"p50": num(dist)}  # a bare number (e.g. prefill tokens_per_s, "Dist-derived p50")
    if not isinstance(dist, dict):
        return {}
    out = {k: num(dist.get(k)) for k in _DIST_STATS}
    values = [v for v in (num(x) for x in dist.get("values") or []) if v is not None]
    if values:
        if out["p10"] is None:
            out["p10"] = float(np.percentile(values, 10))
        if out["p50"] is None:
            out["p50"] = float(np.percentile(values, 50))
        if out["p90"] is None:
            out["p90"] = float(np.percentile(values, 90))
    if out["cv"] is None and out["stdev"] is not None and out["mean"]:
        out["cv"] = out["stdev"] / out["mean"]
    ci: Dict[str, Any] = dist["median_ci"] if isinstance(dist.get("median_ci"), dict) else {}
    out["ci_low"], out["ci_high"] = num(ci.get("low")), num(ci.get("high"))
    out["ci_half_width_pct"] = num(ci.get("half_width_pct"))
    return {k: v for k, v in out.items() if v is not None}


def precision_of(row: Any) -> Dict[str, Any]:
    """A latency row's precision block (how its repeats ended): {} for results written before it existed."""
    p = get(row, "precision")
    return p if isinstance(p, dict) else {}


def capped(row: Any) -> bool:
    """The figure stopped at its time cap before reaching its precision target."""
    return precision_of(row).get("stopped_by") == "time_cap"


def central(dist: Any) -> Optional[float]:
    """The figure a table shows for a Dist: the median (robust to a stray slow run), else the mean."""
    s = dist_stats(dist)
    return s.get("p50", s.get("mean"))


# ---------------------------------------------------------------- picking figures out of a result


def weight_bytes(r: Dict[str, Any]) -> Optional[float]:
    mem = get(r, "metrics", "memory", default={})
    return num(mem.get("weight_bytes_measured")) or num(mem.get("weight_bytes_get_memory_footprint"))


def peak_bytes(r: Dict[str, Any]) -> tuple[Optional[float], Optional[str]]:
    """Peak memory and where it comes from: the CUDA allocator (max over phases), else process RSS (CPU)."""
    mem = get(r, "metrics", "memory", default={})
    phases = mem.get("peak_allocated_bytes")
    if isinstance(phases, dict):
        vals = [v for v in (num(x) for x in phases.values()) if v is not None]
        if vals:
            return max(vals), "allocator"
    elif num(phases) is not None:
        return num(phases), "allocator"
    rss = num(mem.get("rss_peak_bytes"))
    return (rss, "rss") if rss is not None else (None, None)


def kv_bytes_at_peak(r: Dict[str, Any]) -> Optional[float]:
    """Analytic KV cache of the largest measured shape: the one that sets the decode peak."""
    rows = get(r, "metrics", "memory", "kv_cache_bytes_analytic", default=[])
    vals = [num(get(x, "bytes")) for x in rows if isinstance(x, dict)]
    known = [v for v in vals if v is not None]
    return max(known) if known else None


def prefill_rows(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [x for x in get(r, "metrics", "latency", "prefill", default=[]) if isinstance(x, dict)]


def decode_rows(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [x for x in get(r, "metrics", "latency", "decode", default=[]) if isinstance(x, dict)]


# The decode figure a table leads with: the static (compiled, CUDA-graph) path where a cell measured it, which
# docs/stability.md shows is the one to compare (eager decode on a shared host swings by tens of percent), else
# eager; the other path's figure stands beside it, labelled.
DECODE_PATH_PREFERENCE = ("static", "eager")


def headline_decode(r: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The batch-1 decode row a summary shows first for this cell: static where measured, else eager, else any."""
    for path in DECODE_PATH_PREFERENCE:
        row = decode_bs1(r, path)
        if row is not None:
            return row
    return decode_bs1(r, None)


def first_prefill_bs1(r: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    rows = [x for x in prefill_rows(r) if get(x, "batch_size") == 1]
    return rows[0] if rows else None


def decode_bs1(r: Dict[str, Any], path: Optional[str]) -> Optional[Dict[str, Any]]:
    rows = [x for x in decode_rows(r) if get(x, "batch_size") == 1 and (path is None or x.get("decode_path") == path)]
    return rows[0] if rows else None


def task_entry(r: Dict[str, Any], task: str) -> Optional[Dict[str, Any]]:
    t = get(r, "metrics", "accuracy", "tasks", task)
    return t if isinstance(t, dict) else None


def sweep_tasks(results: List[Dict[str, Any]]) -> List[str]:
    """Every task some cell of the sweep evaluated, in the task table's order (then unknown ones, A-Z)."""
    names = {str(k) for r in results for k, t in (get(r, "metrics", "accuracy", "tasks", default={}) or {}).items()
             if isinstance(t, dict)}
    return task_table.order(sorted(names))


def row_tasks(rows: List[Dict[str, Any]]) -> List[str]:
    """The tasks whose columns the summary rows carry, in column order (each group opens with <task>_metric)."""
    if not rows:
        return []
    row = rows[0]
    return [k[: -len("_metric")] for k in row if k.endswith("_metric")
            and f"{k[: -len('_metric')]}_pct" in row and f"{k[: -len('_metric')]}_delta_source" in row]


def task_headline(t: Optional[Dict[str, Any]], task: Optional[str] = None) -> tuple[Optional[str], Optional[float]]:
    """(metric, score as a fraction) a task is headed by: the task table's headline metric where the entry has
    it (also in results written before the table named it), else the run's own headline (``metric``/``value``),
    else the first number of ``metrics``."""
    if not t:
        return None, None
    spec = task_table.lookup(task) if task else None
    metrics: Dict[str, Any] = t["metrics"] if isinstance(t.get("metrics"), dict) else {}
    recorded = t.get("metric") if isinstance(t.get("metric"), str) else None
    if spec is not None:
        if task_table.same_metric(recorded, spec.headline) and num(t.get("value")) is not None:
            return recorded, num(t["value"])
        if num(metrics.get(spec.headline)) is not None:
            return spec.headline, num(metrics[spec.headline])
    if num(t.get("value")) is not None:
        return recorded, num(t["value"])
    for k, v in metrics.items():
        if num(v) is not None:
            return str(k), num(v)
    return None, None


def task_score(t: Optional[Dict[str, Any]], task: Optional[str] = None) -> Optional[float]:
    """The task's headline score as a fraction (see :func:`task_headline`)."""
    return task_headline(t, task)[1]


def chance_level(t: Optional[Dict[str, Any]], task: str) -> Optional[float]:
    """A random guesser's score: the run's record, else the task table's."""
    recorded = num(get(t, "chance_level"))
    spec = task_table.lookup(task)
    return recorded if recorded is not None else (spec.chance_level if spec else None)


def category_score(v: Any) -> Optional[float]:
    if isinstance(v, dict):
        return num(v.get("value", v.get("acc")))
    return num(v)


def task_items(r: Dict[str, Any], task: str, metric: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The task's per-item records with ``correct`` for ``metric`` (default: the run's own headline), or None
    when the cell kept no records of that metric."""
    it = get(r, "metrics", "accuracy", "items", task)
    if not isinstance(it, dict):
        return None
    by_metric: Dict[str, Any] = it["correct_by_metric"] if isinstance(it.get("correct_by_metric"), dict) else {}
    if metric is not None and isinstance(by_metric.get(metric), str):
        return {**it, "correct": by_metric[metric]}
    recorded = get(task_entry(r, task), "metric")  # ``correct`` holds the records of the run's own headline
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

