"""Rounds: one cell measured N times, interleaved with the other cells, each time in a fresh process.

``run.rounds=3`` runs the sweep three times in a row, A B C, A B C, A B C, each pass writing to
``<cell>/rounds/<k>/result.json`` (skip-if-done per round, so an interrupted sweep resumes). Interleaving makes a
node's drift (a slow first process, a neighbour's load, clocks) fall on every method alike instead of on
whichever ran first. Afterwards :func:`combine` writes the cell's own ``result.json``, which is what the report
reads: round 1's result (memory, accuracy and quality come from round 1: they do not drift) with every latency
figure replaced by the median over the rounds and an uncertainty that is the larger of

  * within: the widest of the rounds' own 95 % CIs of the median (± % of the median), and
  * between: half the range of the rounds' medians (± % of their median),

named in ``rounds.dominated_by`` so that the report can say whether more repeats or more rounds would help.
"""
from __future__ import annotations

import copy
import os
import shutil
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from qbench.store.jsonio import read_result, write_result
from qbench.store.layout import round_dir


def _half_width_pct(dist: Dict[str, Any]) -> Optional[float]:
    return ((dist or {}).get("median_ci") or {}).get("half_width_pct")


def combine_figure(dists: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One Dist from the same figure's Dists over rounds: pooled values for the spread statistics, the median
    of the rounds' medians as p50, and ``median_ci`` / ``rounds`` from the larger uncertainty."""
    from qbench.measure.stats import summarize

    medians = [d["p50"] for d in dists]
    center = statistics.median(medians)
    between = 100.0 * (max(medians) - min(medians)) / 2.0 / abs(center) if center else None
    withins = [h for h in (_half_width_pct(d) for d in dists) if h is not None]
    within = max(withins) if withins else None
    candidates = [(v, name) for v, name in ((within, "within-round"), (between, "between-round")) if v is not None]
    half, dominated_by = max(candidates) if candidates else (None, None)
    out = summarize([v for d in dists for v in d.get("values") or [d["p50"]]], dists[0]["unit"])
    out["p50"] = center
    out["median_ci"] = {
        "low": center * (1 - half / 100) if half is not None else None,
        "high": center * (1 + half / 100) if half is not None else None,
        "level": None,  # the larger of two half-widths, not one interval with a computed coverage
        "half_width_pct": half,
    }
    out["rounds"] = {"medians": medians, "within_half_width_pct": within, "between_half_width_pct": between,
                     "dominated_by": dominated_by}
    return out


def _key(row: Dict[str, Any]) -> Tuple:
    return (row.get("decode_path"), row.get("batch_size"), row.get("prompt_tokens"))


def combine_latency(sections: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Round 1's latency section with each figure that every round measured combined over the rounds."""
    out = copy.deepcopy(sections[0])
    for kind, dist_keys in (("prefill", ("ttft_ms",)), ("decode", ("tokens_per_s", "per_token_ms"))):
        by_key = {_key(r): [r] for r in out.get(kind) or []}
        for section in sections[1:]:
            for row in section.get(kind) or []:
                if _key(row) in by_key:
                    by_key[_key(row)].append(row)
        for rows in by_key.values():
            if len(rows) != len(sections):
                continue  # a figure some round lacks (a path that failed there) stays round 1's
            first = rows[0]
            for name in dist_keys:
                if all(r.get(name) for r in rows):
                    first[name] = combine_figure([r[name] for r in rows])
            _refresh_derived(first, kind)
            first["precision"] = {**(first.get("precision") or {}), "rounds": len(rows),
                                  "dominated_by": (first.get(dist_keys[0]) or {}).get("rounds", {}).get("dominated_by")}
    return out


def _refresh_derived(row: Dict[str, Any], kind: str) -> None:
    """Figures computed from a median follow the combined median."""
    if kind == "prefill":
        p50_s = row["ttft_ms"]["p50"] / 1e3
        row["tokens_per_s"] = row["batch_size"] * row["prompt_tokens"] / p50_s if p50_s > 0 else None
        if row.get("compute_bound_ms") is not None and p50_s > 0:
            row["compute_bound_fraction"] = row["compute_bound_ms"] / 1e3 / p50_s
        return
    tps = row["tokens_per_s"]["p50"]
    for bound, fraction in (("bandwidth_bound_tokens_per_s", "bandwidth_bound_fraction"),
                            ("measured_bandwidth_bound_tokens_per_s", "measured_bandwidth_bound_fraction")):
        if row.get(bound):
            row[fraction] = tps / row[bound]


def _copy_atomic(src: Path, dest: Path) -> None:
    """A copy that a full disk cannot leave half-written: through a temp file beside ``dest``, then rename."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def combine(cell_dir: Path, rounds: int) -> Optional[Dict[str, Any]]:
    """Write ``<cell_dir>/result.json`` from its rounds; None (nothing written) while a round has no result."""
    cell_dir = Path(cell_dir)
    results = [read_result(round_dir(cell_dir, k)) for k in range(1, rounds + 1)]
    if any(r is None for r in results):
        return None
    combined = copy.deepcopy(results[0])
    combined["round"] = None
    failed = [(k, r) for k, r in enumerate(results, 1) if r.get("status") != "ok"]
    if failed:
        k, r = failed[0]
        combined["status"] = "error"
        combined["error"] = {**(r.get("error") or {}), "message": f"round {k}: {(r.get('error') or {}).get('message')}"}
    latency = [(r.get("metrics") or {}).get("latency") for r in results]
    if not failed and all(latency):
        combined["metrics"]["latency"] = combine_latency(latency)
    combined["rounds"] = {
        "n": rounds, "order": "interleaved: every cell of the sweep once per round, each in a fresh process",
        "status": [r.get("status") for r in results], "pids": [r.get("pid") for r in results],
        "started_at": [r.get("started_at") for r in results],
        "latency_s": [(r.get("timings") or {}).get("latency_s") for r in results],
    }
    for k, r in enumerate(results[1:], 2):
        combined["warnings"] = combined.get("warnings", []) + [f"round {k}: {w}" for w in r.get("warnings", [])]
    for extra in round_dir(cell_dir, 1).glob("*.npz"):  # quality files live beside the result the report reads
        _copy_atomic(extra, cell_dir / extra.name)
    write_result(cell_dir, combined)
    return combined
