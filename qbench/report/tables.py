"""Tables of a sweep: from the results report.loading reads, the summary (one row per cell) and the tidy
table (one row per cell x metric x statistic).

result.json (docs/results.md) is the only input. A missing measurement stays missing (NaN / None): the
report never fills a gap with a guess. Sizes are reported in GB = 1e9 bytes, as in the results' byte counts.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pandas as pd

from qbench.config import yaml_defaults  # schemas only: no torch
from qbench.evaluate import tasks as task_table  # stdlib only, like store: the report builds without torch

# The owners, both stdlib only: the MMLU categories in the order the heatmap shows them (other keys found in
# results are appended; charts reads them here) and a dtype's bytes
from qbench.evaluate.lm_eval_tasks import MMLU_CATEGORIES  # noqa: F401
from qbench.measure import decode_paths  # the registry imports nothing heavy: no torch
from qbench.measure.memory import DTYPE_BYTES

# Split along its seams: reading results (loading) and a result's figures (figures); their names stay
# reachable as tables.<name>, which html, charts, decision and the tests call
from qbench.report.figures import (  # noqa: F401
    _DIST_STATS,
    DECODE_PATH_PREFERENCE,
    align_items,
    capped,
    category_score,
    central,
    chance_level,
    decode_bs1,
    decode_rows,
    dist_stats,
    first_prefill_bs1,
    headline_decode,
    kv_bytes_at_peak,
    load_paired_compare,
    peak_bytes,
    precision_of,
    prefill_rows,
    row_tasks,
    sweep_tasks,
    task_entry,
    task_headline,
    task_items,
    task_score,
    weight_bytes,
)
from qbench.report.loading import (  # noqa: F401
    _TYPE_NAME,
    CV_WARN_DEFAULT,
    RESULT_SHAPE,
    cv_threshold,
    get,
    is_demo,
    is_random,
    load_results,
    num,
    shape_problem,
    typed_problem,
    unreadable,
)
from qbench.store.rows import cause_line

GB = 1e9
_DEFAULT_BASELINE = str(yaml_defaults("run").baseline_method)  # conf/config.yaml's, for results that record none
# When the configured baseline did not run in the sweep: a method that quantized nothing, in this dtype order
BASELINE_FALLBACK_DTYPES = ("bfloat16", "float16", "float32")

TIDY_COLUMNS = [
    "sweep", "cell", "model", "method", "method_kind", "status", "error_class", "random_weights", "device",
    "group", "metric", "stat", "value", "unit",
    "phase", "batch_size", "prompt_tokens", "new_tokens", "seq_len_tokens", "decode_path",
    "task", "category", "num_fewshot", "limit", "n_items",
]
_INT_COLUMNS = ("batch_size", "prompt_tokens", "new_tokens", "seq_len_tokens", "num_fewshot", "n_items")



# ---------------------------------------------------------------- baseline


def baseline_method(results: List[Dict[str, Any]]) -> Optional[str]:
    """config.run.baseline_method of the cells (most common, default RunConfig's), else a method that quantized
    nothing (memory.params_quantized_measured 0), bfloat16 before float16 before float32."""
    methods = {r["method"] for r in results}
    configured = Counter(str(get(r, "config", "run", "baseline_method", default=_DEFAULT_BASELINE)) for r in results)
    for m, _ in configured.most_common():
        if m in methods:
            return m
    unquantized = {str(get(r, "config", "method", "dtype", default="")): r["method"] for r in results
                   if get(r, "metrics", "memory", "params_quantized_measured") == 0}
    for dtype in BASELINE_FALLBACK_DTYPES:
        if dtype in unquantized:
            return unquantized[dtype]
    return None


def configured_baseline(results: List[Dict[str, Any]]) -> str:
    c = Counter(str(get(r, "config", "run", "baseline_method", default=_DEFAULT_BASELINE)) for r in results)
    return c.most_common(1)[0][0] if c else _DEFAULT_BASELINE


def baseline_cells(results: List[Dict[str, Any]], base: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """model -> its baseline cell, when that cell finished ok."""
    return {r["model"]: r for r in results if r["method"] == base and r["status"] == "ok"}


# ---------------------------------------------------------------- summary


def _ordered(results: List[Dict[str, Any]], base: Optional[str]) -> List[Dict[str, Any]]:
    """Sweep order for display: models in first-seen order, the baseline first within a model."""
    models = list(dict.fromkeys(r["model"] for r in results))
    return sorted(results, key=lambda r: (models.index(r["model"]), r["method"] != base, r["method"]))


def _task_columns(r: Dict[str, Any], task: str, base_cell: Optional[Dict[str, Any]],
                  paired: Optional[Callable]) -> Dict[str, Any]:
    t = task_entry(r, task)
    metric, score = task_headline(t, task)
    chance = chance_level(t, task)
    out: Dict[str, Any] = {
        f"{task}_metric": metric,
        f"{task}_pct": None if score is None else 100 * score,
        f"{task}_chance_pct": None if chance is None else 100 * chance,
        f"{task}_n": num(get(t, "n_items")),
        f"{task}_limit": num(get(t, "limit")),
        f"{task}_fewshot": num(get(t, "num_fewshot")),
        f"{task}_delta_pp": None, f"{task}_ci_low_pp": None, f"{task}_ci_high_pp": None,
        f"{task}_flip_pct": None, f"{task}_mcnemar_p": None, f"{task}_paired_n": None,
        f"{task}_delta_source": None,
    }
    if score is None or base_cell is None or base_cell is r:
        return out
    base_metric, base_score = task_headline(task_entry(base_cell, task), task)
    if base_metric and metric and not task_table.same_metric(base_metric, metric):
        return out  # the two cells' headlines are different metrics: no difference to take
    b_items, c_items = task_items(base_cell, task, metric), task_items(r, task, metric)
    if paired is not None and b_items and c_items:
        b, c = align_items(b_items, c_items)
        try:
            res = paired(b, c) if b else None
        except ValueError:
            res = None  # malformed records (a character other than 0/1): fall back to the plain difference
        if res:
            out.update({
                f"{task}_delta_pp": _pp(res.get("delta")), f"{task}_ci_low_pp": _pp(res.get("ci_low")),
                f"{task}_ci_high_pp": _pp(res.get("ci_high")), f"{task}_flip_pct": _pp(res.get("flip_rate")),
                f"{task}_mcnemar_p": num(res.get("mcnemar_p")), f"{task}_paired_n": num(res.get("n")),
                f"{task}_delta_source": "paired",
            })
            return out
    if base_score is not None:
        # No per-item records (or no paired module): the plain difference, with no interval.
        out[f"{task}_delta_pp"] = 100 * (score - base_score)
        out[f"{task}_delta_source"] = "difference"
    return out


def _pp(x: Any) -> Optional[float]:
    v = num(x)
    return None if v is None else 100 * v


UNQUANTIZED_WARN_FRACTION = 0.10  # qbench.measure.memory's thresholds, read here from results alone
RATIO_BAND = (0.99, 1.01)


def memory_flags(r: Dict[str, Any]) -> Dict[str, Any]:
    """What the method quantized (percent of parameters and of bytes) and the two memory warnings, computed
    from the figures so that results written before the cell warned about them are flagged too."""
    mem = get(r, "metrics", "memory", default={})
    ratio = num(mem.get("weight_measured_over_analytic"))
    frac = num(mem.get("decoder_unquantized_fraction"))
    bits, dtype_bits = num(mem.get("bits_per_weight_quantized")), 8 * DTYPE_BYTES.get(
        str(get(r, "config", "method", "dtype", default="")), 99)
    quantizes = bits is not None and bits < dtype_bits - 1e-6
    qp, qb = num(mem.get("quantized_params_fraction")), num(mem.get("quantized_bytes_fraction"))
    return {
        "quantized_params_pct": None if qp is None else 100 * qp,
        "quantized_bytes_pct": None if qb is None else 100 * qb,
        "decoder_unquantized_pct": None if frac is None else 100 * frac,
        "unquantized_high": quantizes and frac is not None and frac > UNQUANTIZED_WARN_FRACTION,
        "weight_ratio": ratio,
        "weight_ratio_off": ratio is not None and not RATIO_BAND[0] <= ratio <= RATIO_BAND[1],
    }


def summary_rows(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One dict per cell (= model x method) with the numbers of the summary table, raw (not formatted)."""
    base = baseline_method(results)
    bases = baseline_cells(results, base)
    paired = load_paired_compare()
    tasks = sweep_tasks(results)
    rows = []
    for r in _ordered(results, base):
        b = bases.get(r["model"])
        wb, bw = weight_bytes(r), (weight_bytes(b) if b else None)
        peak, peak_src = peak_bytes(r)
        pre = first_prefill_bs1(r)
        dec = headline_decode(r)
        eager = dist_stats(get(decode_bs1(r, "eager"), "tokens_per_s"))
        thr = cv_threshold(r)
        ttft = dist_stats(get(pre, "ttft_ms"))
        tps = dist_stats(get(dec, "tokens_per_s"))
        bwf = num(get(dec, "bandwidth_bound_fraction"))
        bwm = num(get(dec, "measured_bandwidth_bound_fraction"))
        graph = decode_bs1(r, "graph")
        graph_tps = dist_stats(get(graph, "tokens_per_s"))
        err = r.get("error") if isinstance(r.get("error"), dict) else {}
        row = {
            "sweep": r["sweep"], "cell": r["cell"], "model": r["model"], "method": r["method"],
            "method_kind": r.get("method_kind"), "status": r["status"], "is_baseline": r["method"] == base,
            "random_weights": is_random(r), "device": r.get("device"),
            "error_class": err.get("class"), "error_type": err.get("type"),
            # one line even for results written before the cause was extracted (a whole log tail)
            "error_message": cause_line(str(err["message"])) if err.get("message") else None,
            "error_phase": err.get("phase"),
            "weights_gb": None if wb is None else wb / GB,
            "compression_x": (bw / wb) if (wb and bw) else None,
            "peak_gb": None if peak is None else peak / GB, "peak_source": peak_src,
            "prefill_prompt_tokens": num(get(pre, "prompt_tokens")),
            "ttft_ms": ttft.get("p50", ttft.get("mean")), "ttft_cv": ttft.get("cv"),
            "ttft_cv_high": (ttft.get("cv") or 0) > thr,
            "ttft_ci_pct": ttft.get("ci_half_width_pct"), "ttft_capped": capped(pre),
            "decode_path": get(dec, "decode_path"),
            "decode_tps": tps.get("p50", tps.get("mean")), "decode_cv": tps.get("cv"),
            "decode_cv_high": (tps.get("cv") or 0) > thr,
            "decode_ci_pct": tps.get("ci_half_width_pct"), "decode_capped": capped(dec),
            "decode_ci_dominated_by": precision_of(dec).get("dominated_by"),
            "decode_eager_tps": eager.get("p50", eager.get("mean")),
            "decode_eager_cv_high": (eager.get("cv") or 0) > thr,
            "decode_eager_ci_pct": eager.get("ci_half_width_pct"), "decode_eager_capped": capped(decode_bs1(r, "eager")),
            "decode_graph_tps": graph_tps.get("p50"), "decode_graph_ci_pct": graph_tps.get("ci_half_width_pct"),
            "decode_graph_capped": capped(graph),
            "bw_bound_pct": None if bwf is None else 100 * bwf,
            "bw_measured_pct": None if bwm is None else 100 * bwm,
            "copy_bandwidth_tb_s": (None if num(get(r, "metrics", "latency", "copy_bandwidth", "bytes_per_s")) is None
                                    else num(get(r, "metrics", "latency", "copy_bandwidth", "bytes_per_s")) / 1e12),
            "quantize_s": num(get(r, "timings", "quantize_s")),
            **memory_flags(r),
            "wall_time_s": num(r.get("wall_time_s")),
            "node": get(r, "scheduler", "node"), "slurm_job_id": get(r, "scheduler", "job_id"),
            "warnings": [str(w) for w in r.get("warnings") or []],
        }
        for task in tasks:
            row.update(_task_columns(r, task, b, paired))
        row.update(quality_columns(r))
        q = get(r, "metrics", "quality")
        row["warnings"] += quality_warnings(q if isinstance(q, dict) else {}, row["warnings"])
        rows.append(row)
    return rows


def quality_columns(r: Dict[str, Any]) -> Dict[str, Any]:
    """The quality-vs-baseline numbers of one cell (metrics.quality), flat; None where not measured."""
    q = get(r, "metrics", "quality") if isinstance(get(r, "metrics", "quality"), dict) else {}
    c = q.get("comparison") if isinstance(q.get("comparison"), dict) else {}
    kl, top1, ratio = (c.get(k) if isinstance(c.get(k), dict) else {}
                       for k in ("kl_divergence", "top1_agreement_pct", "ppl_ratio"))
    dp = c.get("delta_p_pct") if isinstance(c.get("delta_p_pct"), dict) else {}
    ppl_eval = get(r, "metrics", "accuracy", "perplexity")
    return {
        "ppl": num(q.get("ppl")), "ppl_ci_low": num(q.get("ppl_ci95_low")), "ppl_ci_high": num(q.get("ppl_ci95_high")),
        "ppl_ratio": num(ratio.get("mean")), "ppl_ratio_ci_low": num(ratio.get("ci95_low")),
        "ppl_ratio_ci_high": num(ratio.get("ci95_high")),
        "kl_mean": num(kl.get("mean")), "kl_ci_low": num(kl.get("ci95_low")), "kl_ci_high": num(kl.get("ci95_high")),
        "kl_median": num(kl.get("p50")), "kl_p99": num(kl.get("p99")), "kl_max": num(kl.get("max")),
        "top1_pct": num(top1.get("mean")), "top1_ci_low": num(top1.get("ci95_low")),
        "top1_ci_high": num(top1.get("ci95_high")),
        "dp_rms_pct": num(dp.get("rms")),
        "quality_tokens": num(kl.get("n_tokens") or q.get("n_tokens")),
        "quality_source": q.get("comparison_source"),
        "quality_role": q.get("role"),
        "perplexity_eval": num(get(ppl_eval, "value")) if isinstance(ppl_eval, dict) else None,
        **kept_mass_columns(q),
        "quality_batch_size": num(get(q, "settings", "batch_size")),
        "quality_nonfinite": "; ".join(quality_nonfinite(q)) or None,
    }


def kept_mass_columns(q: Dict[str, Any]) -> Dict[str, Any]:
    """How much probability the cell's stored distributions keep exactly: the minimum over positions, the coverage
    it was meant to reach, and whether a cap cut below it (then the KL bound of docs/results.md#quality fails)."""
    kept_min, coverage = num(q.get("kept_mass_min")), num(get(q, "settings", "coverage"))
    low = kept_min is not None and coverage is not None and kept_min < coverage - KEPT_MASS_TOLERANCE
    return {"kept_mass_min": kept_min, "kept_coverage": coverage, "kept_mass_low": low}


# float64 sums of fp32 probabilities: below coverage by more than this, a cap cut (qbench/evaluate/quality.py)
KEPT_MASS_TOLERANCE = 1e-6


def quality_nonfinite(q: Dict[str, Any]) -> List[str]:
    """Why the cell's quality figures are not finite, one line each (``quality: <figure> not finite: <why>``).

    The store writes NaN as null, so a null perplexity or KL of a cell that measured quality is a non-finite
    figure: the cell's own reason where it recorded one (``nonfinite``), else a line saying none was recorded."""
    if not q or q.get("role") not in ("baseline", "compared"):
        return []
    recorded = q.get("nonfinite") if isinstance(q.get("nonfinite"), dict) else {}
    c = q.get("comparison") if isinstance(q.get("comparison"), dict) else None
    if c is not None and isinstance(c.get("nonfinite"), str):
        recorded = {**recorded, "kl": c["nonfinite"]}
    out = [f"quality: {k} not finite: {why}" for k, why in recorded.items() if isinstance(why, str)]
    if "ppl" not in recorded and num(q.get("ppl")) is None:
        out.append("quality: ppl not finite (stored as null; the result records no reason)")
    if c is not None and "kl" not in recorded and num(get(c, "kl_divergence", "mean")) is None:
        out.append("quality: kl not finite (stored as null; the result records no reason)")
    return out


def quality_warnings(q: Dict[str, Any], have: List[str]) -> List[str]:
    """The quality lines a cell's warnings should hold and do not yet (results written before the cell wrote
    them, or figures computed at report time): non-finite figures and a kept mass below its coverage."""
    lines = quality_nonfinite(q)
    kept = kept_mass_columns(q)
    if kept["kept_mass_low"] and not any("max_kept" in w for w in have):
        lines.append(f"quality: stored distributions keep mass down to {kept['kept_mass_min']:.4f} < coverage "
                     f"{kept['kept_coverage']:g} (eval.quality.max_kept cut them): KL is a looser lower bound there")
    return [w for w in lines if w not in have]


def summary_table(results: List[Dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(summary_rows(results))


# ---------------------------------------------------------------- tidy


def _cell_context(r: Dict[str, Any]) -> Dict[str, Any]:
    err = r.get("error") if isinstance(r.get("error"), dict) else {}
    return {"sweep": r["sweep"], "cell": r["cell"], "model": r["model"], "method": r["method"],
            "method_kind": r.get("method_kind"), "status": r["status"], "error_class": err.get("class"),
            "random_weights": is_random(r), "device": r.get("device")}


def _tidy_cell(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    ctx = _cell_context(r)
    rows: List[Dict[str, Any]] = []

    def add(group: str, metric: str, value: Any, unit: Optional[str], stat: str = "value", **extra: Any) -> None:
        v = num(value)
        if v is None:
            return
        rows.append({**ctx, "group": group, "metric": metric, "stat": stat, "value": v, "unit": unit, **extra})

    def add_dist(group: str, metric: str, dist: Any, unit: Optional[str], **extra: Any) -> None:
        for stat, v in dist_stats(dist).items():
            add(group, metric, v, None if stat in ("cv", "n") else "%" if stat == "ci_half_width_pct" else unit,
                stat=stat, **extra)

    # Every cell gets its wall time row (NaN when null), so an error cell with nothing measured is still there.
    rows.append({**ctx, "group": "run", "metric": "wall_time_s", "stat": "value",
                 "value": num(r.get("wall_time_s")), "unit": "s"})
    for k, v in (get(r, "timings", default={}) or {}).items():
        add("run", f"timings.{k}", v, "s" if k.endswith("_s") else None)

    mem = get(r, "metrics", "memory", default={})
    for k in ("weight_bytes_measured", "weight_bytes_get_memory_footprint", "weight_bytes_analytic",
              "rss_peak_bytes"):
        add("memory", k, mem.get(k), "bytes")
    add("memory", "weight_measured_over_analytic", mem.get("weight_measured_over_analytic"), "ratio")
    add("memory", "bits_per_weight_quantized", mem.get("bits_per_weight_quantized"), "bits")
    add("memory", "params_total", mem.get("params_total"), "count")
    add("memory", "params_quantized", mem.get("params_quantized"), "count")
    add("memory", "params_quantized_measured", mem.get("params_quantized_measured"), "count")
    add("memory", "weight_bytes_quantized_measured", mem.get("weight_bytes_quantized_measured"), "bytes")
    for k in ("quantized_params_fraction", "quantized_bytes_fraction", "decoder_unquantized_fraction"):
        add("memory", k, mem.get(k), "fraction")
    for k in ("peak_allocated_bytes", "peak_reserved_bytes", "nvml_used_bytes"):
        if isinstance(mem.get(k), dict):
            for phase, v in mem[k].items():
                add("memory", k, v, "bytes", phase=phase)
        else:
            add("memory", k, mem.get(k), "bytes")
    for kv in mem.get("kv_cache_bytes_analytic") or []:
        add("memory", "kv_cache_bytes_analytic", get(kv, "bytes"), "bytes",
            batch_size=get(kv, "batch_size"), seq_len_tokens=get(kv, "seq_len_tokens"))

    for p in prefill_rows(r):
        shape = {"batch_size": p.get("batch_size"), "prompt_tokens": p.get("prompt_tokens")}
        add_dist("latency", "prefill.ttft_ms", p.get("ttft_ms"), "ms", **shape)
        add_dist("latency", "prefill.tokens_per_s", p.get("tokens_per_s"), "tokens/s", **shape)
        add("latency", "prefill.compute_bound_fraction", p.get("compute_bound_fraction"), "fraction", **shape)
    for d in decode_rows(r):
        shape = {"batch_size": d.get("batch_size"), "prompt_tokens": d.get("prompt_tokens"),
                 "new_tokens": d.get("new_tokens"), "decode_path": d.get("decode_path")}
        add_dist("latency", "decode.tokens_per_s", d.get("tokens_per_s"), "tokens/s", **shape)
        add_dist("latency", "decode.per_token_ms", d.get("per_token_ms"), "ms", **shape)
        add("latency", "decode.bandwidth_bound_tokens_per_s", d.get("bandwidth_bound_tokens_per_s"), "tokens/s",
            **shape)
        add("latency", "decode.bandwidth_bound_fraction", d.get("bandwidth_bound_fraction"), "fraction", **shape)
        add("latency", "decode.measured_bandwidth_bound_fraction", d.get("measured_bandwidth_bound_fraction"),
            "fraction", **shape)
        add("latency", "decode.capped", float(capped(d)) if precision_of(d) else None, "bool", **shape)
        add("latency", "decode.energy_j_per_token", d.get("energy_j_per_token"), "J/token", **shape)
    for k, v in (get(r, "metrics", "latency", "one_time", default={}) or {}).items():
        add("latency", f"one_time.{k}", v, "s" if k.endswith("_s") else None)

    rows += _accuracy_tidy(r, ctx)
    rows += _quality_tidy(r, ctx)
    return rows


def _accuracy_tidy(r: Dict[str, Any], ctx: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The accuracy figures of one cell as tidy rows: per task its headline first (``<task>.<metric>``), every
    other metric lm-eval reported, stderr, timing and MMLU's categories; then perplexity."""
    rows: List[Dict[str, Any]] = []

    def add(metric: str, value: Any, unit: str, **extra: Any) -> None:
        if num(value) is not None:
            rows.append({**ctx, "group": "accuracy", "metric": metric, "stat": "value", "value": num(value),
                         "unit": unit, **extra})

    for task, t in (get(r, "metrics", "accuracy", "tasks", default={}) or {}).items():
        if not isinstance(t, dict):
            continue
        ctx_t = {"task": task, "num_fewshot": t.get("num_fewshot"), "limit": num(t.get("limit")),
                 "n_items": t.get("n_items")}
        metric, score = task_headline(t, task)
        add(f"{task}.{metric or 'value'}", score, "fraction", **ctx_t)
        metrics = t.get("metrics") if isinstance(t.get("metrics"), dict) else {}
        for mk, mv in metrics.items():
            if not task_table.same_metric(mk, metric):
                add(f"{task}.{mk}", mv, "fraction", **ctx_t)
        stderrs = t.get("stderrs") if isinstance(t.get("stderrs"), dict) else {}
        own = task_table.same_metric(metric, t.get("metric") if isinstance(t.get("metric"), str) else None)
        add(f"{task}.stderr", t.get("stderr") if own else stderrs.get(metric or ""), "fraction", **ctx_t)
        add(f"{task}.eval_time_s", t.get("eval_time_s"), "s", **ctx_t)
        add(f"{task}.items_per_s", t.get("items_per_s"), "items/s", **ctx_t)
        for cat, cv in (t.get("categories") or {}).items() if isinstance(t.get("categories"), dict) else []:
            add(f"{task}.category", category_score(cv), "fraction", category=cat, **ctx_t)
    ppl = get(r, "metrics", "accuracy", "perplexity")
    if isinstance(ppl, dict):
        add("perplexity", ppl.get("value"), "perplexity", seq_len_tokens=ppl.get("seq_len_tokens"),
            task=str(ppl.get("source")) if ppl.get("source") else None)
    return rows


def _quality_tidy(r: Dict[str, Any], ctx: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The quality figures of one cell as tidy rows (corpus in ``task``, window length in ``seq_len_tokens``)."""
    q = quality_columns(r)
    extra = {"seq_len_tokens": get(r, "metrics", "quality", "settings", "ctx_tokens"),
             "task": get(r, "metrics", "quality", "settings", "source")}
    return [{**ctx, "group": "quality", "metric": key, "stat": "value", "value": q[key], "unit": unit, **extra}
            for key, unit in QUALITY_TIDY if q.get(key) is not None]


# summary keys of quality_columns that go into the tidy table, with their units
QUALITY_TIDY = (
    ("ppl", "perplexity"), ("ppl_ci_low", "perplexity"), ("ppl_ci_high", "perplexity"),
    ("ppl_ratio", "ratio to baseline"), ("ppl_ratio_ci_low", "ratio to baseline"),
    ("ppl_ratio_ci_high", "ratio to baseline"),
    ("kl_mean", "nats/token"), ("kl_ci_low", "nats/token"), ("kl_ci_high", "nats/token"),
    ("kl_median", "nats/token"), ("kl_p99", "nats/token"), ("kl_max", "nats/token"),
    ("top1_pct", "% of tokens"), ("top1_ci_low", "% of tokens"), ("top1_ci_high", "% of tokens"),
    ("dp_rms_pct", "pp of probability"), ("kept_mass_min", "fraction of probability"),
)


def tidy_table(results: List[Dict[str, Any]]) -> pd.DataFrame:
    """Every cell and metric, one row per cell x metric x statistic (p50, mean, p90, ... for a Dist)."""
    rows = [row for r in results for row in _tidy_cell(r)]
    df = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    df["limit"] = pd.to_numeric(df["limit"], errors="coerce").astype("float64")
    for c in _INT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    df["random_weights"] = df["random_weights"].astype("boolean")
    for c in ("sweep", "cell", "model", "method", "method_kind", "status", "error_class", "device", "group",
              "metric", "stat", "unit", "phase", "decode_path", "task", "category"):
        df[c] = df[c].astype("string")
    return df


def write_tables(results: List[Dict[str, Any]], out_dir: Path) -> Dict[str, Path]:
    """results_tidy.csv / .parquet and summary.csv in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tidy = tidy_table(results)
    paths = {"tidy_csv": out_dir / "results_tidy.csv", "tidy_parquet": out_dir / "results_tidy.parquet",
             "summary_csv": out_dir / "summary.csv"}
    tidy.to_csv(paths["tidy_csv"], index=False)
    tidy.to_parquet(paths["tidy_parquet"], index=False)
    summary = summary_table(results)
    if "warnings" in summary:
        summary["warnings"] = summary["warnings"].map(lambda w: " | ".join(w))
    summary.to_csv(paths["summary_csv"], index=False)
    return paths


def decode_gap_rows(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Where decode time goes, per ok cell and batch size that measured the graph path: the bound from the card's
    measured copy bandwidth (datasheet's where none was measured), what the compiled step alone reaches (graph:
    the kernels' share of the gap), what generate around the same step reaches (static: generate's share), and
    the eager generate users of the plain API get. Each speed is tokens/s (p50) with its CI half-width."""
    rows = []
    for r in results:
        if r.get("status") != "ok":
            continue
        by_path: Dict[Any, Dict[str, Any]] = {}
        for d in decode_rows(r):
            by_path.setdefault(d.get("batch_size"), {})[d.get("decode_path")] = d
        for batch, paths in sorted(by_path.items(), key=lambda kv: kv[0] or 0):
            graph = paths.get("graph")
            if graph is None:
                continue
            measured = num(graph.get("measured_bandwidth_bound_tokens_per_s"))
            bound = measured if measured is not None else num(graph.get("bandwidth_bound_tokens_per_s"))
            row = {"cell": r["cell"], "model": r["model"], "method": r["method"], "batch_size": batch,
                   "bound_tps": bound, "bound_source": "measured copy bandwidth" if measured is not None else "datasheet"}
            for path in decode_paths.names():
                st = dist_stats(get(paths.get(path), "tokens_per_s"))
                row[f"{path}_tps"], row[f"{path}_ci_pct"] = st.get("p50"), st.get("ci_half_width_pct")
                row[f"{path}_pct_of_bound"] = 100 * st["p50"] / bound if bound and st.get("p50") else None
            g, st_ = row["graph_tps"], row["static_tps"]
            row["generate_keeps_pct"] = 100 * st_ / g if g and st_ else None
            rows.append(row)
    return rows

