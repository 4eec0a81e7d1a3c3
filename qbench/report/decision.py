"""The decision panel: which method, for a quality budget; and the claims table that checks rules of thumb.

Python gathers, per model, every finished cell's deciding figures with their uncertainty (weights; KL divergence
and perplexity ratio against the baseline with their 95 % CIs; accuracy Δ with its paired 95 % CI; decode
tokens/s at each batch size with the 95 % CI of its median) into plain JSON. The page's script only filters that
JSON by the budget the reader types and picks; :func:`decide` is the same rule in Python (the tests hold the
script to it, and docs/report.md states it):

- a cell is *within budget* when each constraint the sweep measured holds: KL ≤ x, PPL ratio ≤ y, and for every
  task Δ ≥ −z pp. By default on the point estimate; ``strict`` uses the pessimistic end of the 95 % CI instead
  (KL and PPL ratio: the upper end; Δ: the lower end). The baseline is within budget by definition. Random-weight
  cells are not judged on accuracy (it sits at chance). A constraint nobody measured is off; a cell that lacks a
  figure others have is left out, and says so;
- *least weight memory*: the smallest measured weight footprint within budget; footprints within 1 % of it
  (the band the report already allows between measured and analytic bytes) are a tie;
- *fastest decode at batch b*: the highest tokens/s within budget, on each cell's headline path (static where
  measured, else eager: the summary's rule); every cell whose 95 % CI overlaps the winner's is a tie.

Nothing here imports plotly or torch: the panel is testable from result files alone.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from qbench.evaluate import tasks as task_table
from qbench.measure import stats
from qbench.report import tables as T
from qbench.store.result import ABSENT, DecodeFigure, Dist, Result

DEFAULT_BUDGET: Dict[str, Any] = {
    "kl_max": 0.05,         # nats/token, mean KL(baseline || method)
    "ppl_ratio_max": 1.05,  # perplexity(method) / perplexity(baseline): 5 % worse at most
    "acc_drop_pp": 2.0,     # every task's accuracy Δ ≥ -2 pp
    "strict": False,        # True: the whole 95 % CI must sit within budget, not just the point estimate
}
MEMORY_TIE_FRACTION = 0.01  # weights within 1 % of the smallest: the measured-vs-analytic band of the report
SIXTEEN_BIT_DTYPES = ("bfloat16", "float16")
DTYPE_BITS = {name: 8 * size for name, size in T.DTYPE_BYTES.items()}
MINUS = "\u2212"


def _ci(v: Any, lo: Any, hi: Any) -> Optional[Dict[str, Optional[float]]]:
    """{"v", "lo", "hi"} (lo/hi None without an interval), or None where the figure was not measured."""
    v = T.num(v)
    if v is None:
        return None
    lo, hi = T.num(lo), T.num(hi)
    return {"v": v, "lo": lo if hi is not None else None, "hi": hi if lo is not None else None}


def decode_figure(row: DecodeFigure) -> Optional[Dict[str, Any]]:
    """tokens/s (median) with the 95 % CI of the median: the recorded one, else computed from the raw values
    (results written before the CI was stored); its level says what coverage a small sample really has."""
    s = T.dist_stats(row.tokens_per_s)
    dist = row.tokens_per_s if isinstance(row.tokens_per_s, Dist) else None
    v = s.get("p50", s.get("mean"))
    if v is None:
        return None
    lo, hi, level = s.get("ci_low"), s.get("ci_high"), None
    ci = dist.median_ci if dist and dist.median_ci else None
    level = T.num(ci.level) if ci else None
    values = sorted(x for x in (T.num(y) for y in ((dist.values or []) if dist else [])) if x is not None)
    if (lo is None or hi is None) and len(values) >= 2:
        computed = stats.median_ci(values)
        lo, hi, level = computed["low"], computed["high"], computed["level"]
    return {"v": v, "lo": lo, "hi": hi, "level": level, "path": T.present(row.decode_path)}


def decode_by_batch(result: Result) -> Dict[int, Dict[str, Any]]:
    """batch size -> the headline path's decode figure (static where measured, else eager, else any path)."""
    rows: Dict[int, Dict[str, DecodeFigure]] = {}
    for d in T.decode_rows(result):
        bs = T.num(d.batch_size)
        if bs is not None:
            rows.setdefault(int(bs), {}).setdefault(str(d.decode_path or "?"), d)
    out = {}
    for bs, by_path in sorted(rows.items()):
        pick = next((by_path[p] for p in T.DECODE_PATH_PREFERENCE if p in by_path), None)
        pick = pick or next(iter(by_path.values()))
        fig = decode_figure(pick)
        if fig is not None:
            out[bs] = fig
    return out


def _dtype(result: Result) -> str:
    return str(T.get(result.config, "method", "dtype", default=""))


def _nominal_bits(result: Result) -> Optional[int]:
    """The bit width a rule of thumb speaks of: 4 for NF4/GPTQ/HQQ (4.13-4.5 effective), 8 for int8, 16/32 for
    an unquantized dtype. Scales and zero points are what the rule leaves out. The method's own ``bits`` key where
    it has one (a layout's padding is no bit width: torchao int4 on CUDA stores 7.5 bits per SmolLM2 weight), else
    the width a GGUF type is named for (Q6_K: 6, where SmolLM2's 576-wide rows, no multiple of 256, fall back to a
    wider type: 8.1 bits per weight, whole model), else the whole bits of what it stores per quantized weight."""
    declared = T.get(result.config, "method", "bits", default=None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    named = re.match(r"Q(\d)_", str(T.get(result.config, "method", "quant_type", default="")))
    if named:
        return int(named.group(1))
    mem = T.memory_of(result)
    bits = T.num(mem.bits_per_weight_quantized) if mem else None
    quantized = T.num(mem.params_quantized_measured if mem.params_quantized_measured is not ABSENT
                      else mem.params_quantized) if mem else None
    if bits is not None and quantized:
        return int(math.floor(bits + 1e-9))
    return DTYPE_BITS.get(_dtype(result))


def cell_figures(row: Dict[str, Any], result: Result, tasks: List[str]) -> Dict[str, Any]:
    """The figures that decide, for one finished cell."""
    mem = T.memory_of(result)
    params = T.num(mem.params_total) if mem else None
    wb = T.weight_bytes(result)
    return {
        "cell": row["cell"], "method": row["method"], "is_baseline": bool(row["is_baseline"]),
        "random_weights": bool(row["random_weights"]),
        "weights_gb": row.get("weights_gb"),
        "bits_per_weight": (8 * wb / params) if (wb and params) else None,  # whole model, scales included
        "nominal_bits": _nominal_bits(result),
        "kl": _ci(row.get("kl_mean"), row.get("kl_ci_low"), row.get("kl_ci_high")),
        "ppl_ratio": _ci(row.get("ppl_ratio"), row.get("ppl_ratio_ci_low"), row.get("ppl_ratio_ci_high")),
        "acc": {t: _ci(row.get(f"{t}_delta_pp"), row.get(f"{t}_ci_low_pp"), row.get(f"{t}_ci_high_pp"))
                for t in tasks if T.num(row.get(f"{t}_delta_pp")) is not None},
        "decode": {str(bs): fig for bs, fig in decode_by_batch(result).items()},
    }


def sixteen_bit_reference(cells: List[Dict[str, Any]], results: Dict[str, Result]) -> Optional[Dict[str, Any]]:
    """The 16-bit weights a saving is measured against: a bf16 / fp16 cell of the sweep (the baseline first),
    else the fp32 cell's measured bytes halved, which the claims table then says."""
    def dtype(c: Dict[str, Any]) -> str:
        return _dtype(results[c["cell"]])

    unquantized = [c for c in cells if c["weights_gb"] and c["nominal_bits"] == DTYPE_BITS.get(dtype(c))]
    for want in SIXTEEN_BIT_DTYPES:
        found = sorted((c for c in unquantized if dtype(c) == want), key=lambda c: not c["is_baseline"])
        if found:
            return {"method": found[0]["method"], "weights_gb": found[0]["weights_gb"], "derived": False}
    fp32 = [c for c in unquantized if dtype(c) == "float32"]
    if fp32:
        return {"method": fp32[0]["method"], "weights_gb": fp32[0]["weights_gb"] / 2, "derived": True}
    return None


def quality_loss_metric(cells: List[Dict[str, Any]], tasks: List[str]) -> Optional[Dict[str, str]]:
    """What "quality lost" means for the frontier: KL where measured, else PPL ratio, else the first task's Δ."""
    judged = [c for c in cells if not c["is_baseline"]]
    if any(c["kl"] for c in judged):
        return {"key": "kl", "label": "KL divergence (nats/token)"}
    if any(c["ppl_ratio"] for c in judged):
        return {"key": "ppl_ratio", "label": "perplexity ratio"}
    for t in tasks:
        if any(t in c["acc"] and not c["random_weights"] for c in judged):
            return {"key": f"acc:{t}", "label": f"{task_table.label(t)} accuracy lost (pp)"}
    return None


def loss_of(c: Dict[str, Any], metric: Dict[str, str]) -> Optional[Dict[str, Optional[float]]]:
    """The cell's quality loss on ``metric`` as {"v", "lo", "hi"}, larger = worse; the baseline loses nothing."""
    key = metric["key"]
    if c["is_baseline"]:
        return {"v": 1.0 if key == "ppl_ratio" else 0.0, "lo": None, "hi": None}
    if key.startswith("acc:"):
        a = c["acc"].get(key[4:]) if not c["random_weights"] else None
        return None if a is None else {"v": -a["v"], "lo": None if a["hi"] is None else -a["hi"],
                                       "hi": None if a["lo"] is None else -a["lo"]}
    return c[key]


def frontier(cells: List[Dict[str, Any]], metric: Optional[Dict[str, str]]) -> Dict[str, Dict[str, Any]]:
    """cell -> {"on_front": bool, "dominated_by": [{"method", "within_ci"}]}: a cell is dominated when another
    holds no more weight and loses no more quality, one of the two strictly less (point estimates); within_ci
    says the two quality losses' 95 % CIs overlap, so the domination rests on memory alone."""
    out = {}
    losses = [(c, loss_of(c, metric)) for c in cells if metric and c["weights_gb"] is not None]
    pts: List[Tuple[Dict[str, Any], Dict[str, Any]]] = [(c, q) for c, q in losses if q is not None]
    for c, q in pts:
        beaten = [{"method": o["method"], "within_ci": _overlap(q, oq)} for o, oq in pts if o is not c
                  and o["weights_gb"] <= c["weights_gb"] and oq["v"] <= q["v"]
                  and (o["weights_gb"] < c["weights_gb"] or oq["v"] < q["v"])]
        out[c["cell"]] = {"on_front": not beaten, "dominated_by": beaten}
    return out


def _overlap(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Two figures' 95 % CIs overlap; a figure without a CI is its point."""
    alo, ahi = _bounds(a)
    blo, bhi = _bounds(b)
    return alo <= bhi and blo <= ahi


def _bounds(f: Dict[str, Any]) -> tuple:
    lo, hi = f.get("lo"), f.get("hi")
    return (f["v"], f["v"]) if lo is None or hi is None else (lo, hi)


def claims(cells: List[Dict[str, Any]], ref: Optional[Dict[str, Any]], metric: Optional[Dict[str, str]]
           ) -> List[Dict[str, Any]]:
    """Per cell: weight memory saved vs 16-bit, measured and by the rule of thumb (1 - bits/16: "4-bit saves
    75 %"), quality lost per bit removed, and whether it sits on the quality-memory frontier."""
    front = frontier(cells, metric)
    out = []
    for c in sorted(cells, key=lambda c: (c["weights_gb"] is None, -(c["weights_gb"] or 0))):
        saved = (100 * (1 - c["weights_gb"] / ref["weights_gb"])) if (ref and c["weights_gb"]) else None
        rule = None if c["nominal_bits"] is None else 100 * (1 - c["nominal_bits"] / 16)
        bits_off = None if c["bits_per_weight"] is None else 16 - c["bits_per_weight"]
        per_bit = {}
        if bits_off is not None and bits_off > 0.5 and not c["is_baseline"]:  # fp16 vs bf16: no bits removed
            if c["kl"]:
                per_bit["kl"] = c["kl"]["v"] / bits_off
            if c["ppl_ratio"]:
                per_bit["ppl_pct"] = 100 * (c["ppl_ratio"]["v"] - 1) / bits_off
        out.append({"cell": c["cell"], "method": c["method"], "is_baseline": c["is_baseline"],
                    "weights_gb": c["weights_gb"], "bits_per_weight": c["bits_per_weight"],
                    "nominal_bits": c["nominal_bits"], "saved_pct": saved, "rule_pct": rule,
                    "gap_pp": None if saved is None or rule is None else saved - rule,
                    "kl": c["kl"], "ppl_ratio": c["ppl_ratio"], "per_bit": per_bit,
                    "front": front.get(c["cell"])})
    return out


def model_decision(model: str, rows: List[Dict[str, Any]], results: Dict[str, Result],
                   tasks: List[str]) -> Dict[str, Any]:
    """One model's panel: its cells' figures, which constraints the sweep can judge, and the claims."""
    cells = [cell_figures(r, results[r["cell"]], tasks) for r in rows
             if r["model"] == model and r["status"] == "ok" and r["cell"] in results]
    judged = [c for c in cells if not c["is_baseline"]]
    measured = {"kl": any(c["kl"] for c in judged), "ppl_ratio": any(c["ppl_ratio"] for c in judged),
                "acc": [t for t in tasks if any(t in c["acc"] and not c["random_weights"] for c in judged)]}
    metric = quality_loss_metric(cells, tasks)
    ref = sixteen_bit_reference(cells, results)
    return {"model": model, "baseline": next((c["method"] for c in cells if c["is_baseline"]), None),
            "random_weights": any(c["random_weights"] for c in cells), "cells": cells, "measured": measured,
            "batch_sizes": sorted({int(b) for c in cells for b in c["decode"]}), "reference": ref,
            "loss_metric": metric, "claims": claims(cells, ref, metric)}


def decision_data(rows: List[Dict[str, Any]], results: Sequence[T.ResultLike]) -> Dict[str, Any]:
    """The JSON the page embeds: the default budget, the task labels, one panel per model."""
    by_cell = {str(res.cell): res for res in (T.typed(r) for r in results)}
    tasks = T.row_tasks(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    return {"budget": dict(DEFAULT_BUDGET), "memory_tie_fraction": MEMORY_TIE_FRACTION,
            "tasks": {t: task_table.label(t) for t in tasks},
            "models": [model_decision(m, rows, by_cell, tasks) for m in models]}


# ---------------------------------------------------------------- the rule (the page's script does the same)


def within_budget(c: Dict[str, Any], measured: Dict[str, Any], budget: Dict[str, Any]) -> Optional[str]:
    """None when the cell is within budget, else the first reason it is not (one short phrase)."""
    if c["is_baseline"]:
        return None
    strict = bool(budget.get("strict"))
    checks = [("kl", "KL", budget.get("kl_max")), ("ppl_ratio", "PPL ratio", budget.get("ppl_ratio_max"))]
    for key, name, limit in checks:
        if limit is None or not measured[key]:
            continue
        f = c[key]
        if f is None:
            return f"{name} not measured"
        v = f["hi"] if strict and f["hi"] is not None else f["v"]
        if v > limit:
            return f"{name} {v:.4g} > {limit:g}"
    drop = budget.get("acc_drop_pp")
    if drop is not None and not c["random_weights"]:
        for t in measured["acc"]:
            a = c["acc"].get(t)
            if a is None:
                return f"{task_table.label(t)} \u0394 not measured"
            v = a["lo"] if strict and a["lo"] is not None else a["v"]
            if v < -drop:
                return f"{task_table.label(t)} \u0394 {f'{v:.4g}'.replace('-', MINUS)} pp < {MINUS}{drop:g}"
    return None


def decide(model: Dict[str, Any], budget: Dict[str, Any]) -> Dict[str, Any]:
    """The picks for one model's panel under ``budget``: {"memory": [methods], "decode": {bs: [methods]},
    "excluded": {method: reason}}; the winner first, then the cells tied with it."""
    excluded = {c["method"]: why for c in model["cells"] if (why := within_budget(c, model["measured"], budget))}
    ok = [c for c in model["cells"] if c["method"] not in excluded]
    memory: List[str] = []
    sized = sorted((c for c in ok if c["weights_gb"] is not None), key=lambda c: c["weights_gb"])
    if sized:
        least = sized[0]["weights_gb"]
        memory = [c["method"] for c in sized if c["weights_gb"] <= least * (1 + MEMORY_TIE_FRACTION)]
    decode = {}
    for bs in model["batch_sizes"]:
        ranked = sorted((c for c in ok if str(bs) in c["decode"]), key=lambda c: -c["decode"][str(bs)]["v"])
        if ranked:
            best = ranked[0]["decode"][str(bs)]
            decode[bs] = [c["method"] for c in ranked if c is ranked[0] or _overlap(c["decode"][str(bs)], best)]
    return {"memory": memory, "decode": decode, "excluded": excluded}


# ---------------------------------------------------------------- text the page shows (the script arranges it)


def _g(x: float, sig: int) -> str:
    """``sig`` significant digits, trailing zeros kept (0.0200, not 0.02: the digits say the precision)."""
    return f"{x:#.{sig}g}".rstrip(".").replace("-", MINUS)


def ci_text(f: Optional[Dict[str, Any]], sig: int = 3, signed: bool = False, unit: str = "",
            decimals: Optional[int] = None) -> str:
    """'v [lo, hi] unit': ``sig`` significant digits, or ``decimals`` fixed ones (signed: with a sign),
    '\u2014' where not measured."""
    if f is None:
        return "\u2014"
    if decimals is not None or signed:
        spec = f"{'+' if signed else ''},.{1 if decimals is None else decimals}f"
        one = lambda x: format(x, spec).replace("-", MINUS)  # noqa: E731
    else:
        one = lambda x: _g(x, sig)  # noqa: E731
    text = one(f["v"])
    if f.get("lo") is not None and f.get("hi") is not None:
        text += f" [{one(f['lo'])}, {one(f['hi'])}]"
    return text + (f" {unit}" if unit else "")


def _decode_text(f: Dict[str, Any]) -> str:
    text = f"{ci_text(f, decimals=1)} tok/s, {f.get('path') or '?'}"
    level = f.get("level")
    if f.get("lo") is not None and level is not None and level < 0.949:  # n < 6: [min, max] covers less
        text += f" ({100 * level:.1f} % CI)"
    return text


def add_text(data: Dict[str, Any]) -> Dict[str, Any]:
    """Adds the display strings (``*_text``) to decision_data's cells and claims, in place; returns it."""
    labels = data["tasks"]
    for m in data["models"]:
        for c in m["cells"]:
            c["weights_text"] = "\u2014" if c["weights_gb"] is None else f"{_g(c['weights_gb'], 3)} GB"
            c["kl_text"] = ci_text(c["kl"], 3)
            c["ppl_ratio_text"] = ci_text(c["ppl_ratio"], decimals=4)
            c["acc_text"] = {t: f"{labels.get(t, t)} \u0394 {ci_text(a, signed=True, unit='pp')}"
                             for t, a in c["acc"].items()}
            for f in c["decode"].values():
                f["text"] = _decode_text(f)
        for k in m["claims"]:
            k["text"] = _claim_text(k)
    return data


def _claim_text(k: Dict[str, Any]) -> Dict[str, str]:
    def pct(x: Optional[float], signed: bool = False, decimals: int = 1) -> str:
        return "\u2014" if x is None else format(x, f"{'+' if signed else ''}.{decimals}f").replace("-", MINUS)

    front = k["front"]
    if front is None:
        where = "\u2014"
    elif front["on_front"]:
        where = "on the frontier"
    else:
        where = "dominated by " + ", ".join(d["method"] + (" (quality within CI)" if d["within_ci"] else "")
                                            for d in front["dominated_by"])
    return {"weights": "\u2014" if k["weights_gb"] is None else _g(k["weights_gb"], 4),
            "bits": "\u2014" if k["bits_per_weight"] is None else f"{k['bits_per_weight']:.2f}",
            "nominal": "\u2014" if k["nominal_bits"] is None else str(k["nominal_bits"]),
            "saved": pct(k["saved_pct"]), "rule": pct(k["rule_pct"]), "gap": pct(k["gap_pp"], True),
            "kl": ci_text(k["kl"], 3), "ppl_ratio": ci_text(k["ppl_ratio"], decimals=4),
            "kl_per_bit": "\u2014" if "kl" not in k["per_bit"] else _g(k["per_bit"]["kl"], 3),
            "ppl_per_bit": "\u2014" if "ppl_pct" not in k["per_bit"] else pct(k["per_bit"]["ppl_pct"], True, 2),
            "frontier": where}
