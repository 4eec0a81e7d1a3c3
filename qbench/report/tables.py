"""Tables of a sweep: from the results report.loading reads, the summary (one row per cell) and the tidy
table (one row per cell x metric x statistic).

result.json (docs/results.md) is the only input. A missing measurement stays missing (NaN / None): the
report never fills a gap with a guess. Sizes are reported in GB = 1e9 bytes, as in the results' byte counts.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

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
    ResultLike,
    accuracy_of,
    cv_threshold,
    get,
    is_demo,
    is_random,
    latency_of,
    load_results,
    memory_of,
    num,
    present,
    quality_of,
    shape_problem,
    typed,
    typed_problem,
    unreadable,
)
from qbench.store.result import (
    Comparison,
    DecodeFigure,
    DeltaP,
    KvShape,
    MeanCI,
    Memory,
    Quality,
    Result,
    TaskScore,
)
from qbench.store.rows import cause_line

R = TypeVar("R", bound=ResultLike)  # a result as the caller holds it, handed back as it came

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


def _baseline_configured(res: Result) -> str:
    return str(get(res.config, "run", "baseline_method", default=_DEFAULT_BASELINE))


def _dtype(res: Result) -> str:
    return str(get(res.config, "method", "dtype", default=""))


def baseline_method(results: Sequence[ResultLike]) -> Optional[str]:
    """config.run.baseline_method of the cells (most common, default RunConfig's), else a method that quantized
    nothing (memory.params_quantized_measured 0), bfloat16 before float16 before float32."""
    typed_results = [typed(r) for r in results]
    methods = {res.method for res in typed_results}
    configured = Counter(_baseline_configured(res) for res in typed_results)
    for m, _ in configured.most_common():
        if m in methods:
            return m
    unquantized = {_dtype(res): str(res.method) for res in typed_results
                   if (mem := memory_of(res)) is not None and mem.params_quantized_measured == 0}
    for dtype in BASELINE_FALLBACK_DTYPES:
        if dtype in unquantized:
            return unquantized[dtype]
    return None


def configured_baseline(results: Sequence[ResultLike]) -> str:
    c = Counter(_baseline_configured(typed(r)) for r in results)
    return c.most_common(1)[0][0] if c else _DEFAULT_BASELINE


def baseline_cells(results: Sequence[R], base: Optional[str]) -> Dict[str, R]:
    """model -> its baseline cell, when that cell finished ok (each as given: a loaded dict or its typed result)."""
    out: Dict[str, R] = {}
    for r in results:
        res = typed(r)
        if res.method == base and res.status == "ok":
            out[str(res.model)] = r
    return out


# ---------------------------------------------------------------- summary


def _ordered(results: List[Result], base: Optional[str]) -> List[Result]:
    """Sweep order for display: models in first-seen order, the baseline first within a model."""
    models = list(dict.fromkeys(res.model for res in results))
    return sorted(results, key=lambda res: (models.index(res.model), res.method != base, str(res.method)))


def _task_columns(res: Result, task: str, base_cell: Optional[Result],
                  paired: Optional[Callable[[str, str], Dict[str, Any]]]) -> Dict[str, Any]:
    t = task_entry(res, task)
    metric, score = task_headline(t, task)
    chance = chance_level(t, task)
    out: Dict[str, Any] = {
        f"{task}_metric": metric,
        f"{task}_pct": None if score is None else 100 * score,
        f"{task}_chance_pct": None if chance is None else 100 * chance,
        f"{task}_n": num(t.n_items) if t else None,
        f"{task}_limit": num(t.limit) if t else None,
        f"{task}_fewshot": num(t.num_fewshot) if t else None,
        f"{task}_delta_pp": None, f"{task}_ci_low_pp": None, f"{task}_ci_high_pp": None,
        f"{task}_flip_pct": None, f"{task}_mcnemar_p": None, f"{task}_paired_n": None,
        f"{task}_delta_source": None,
    }
    if score is None or base_cell is None or base_cell is res:
        return out
    base_metric, base_score = task_headline(task_entry(base_cell, task), task)
    if base_metric and metric and not task_table.same_metric(base_metric, metric):
        return out  # the two cells' headlines are different metrics: no difference to take
    b_items, c_items = task_items(base_cell, task, metric), task_items(res, task, metric)
    if paired is not None and b_items and c_items:
        b, c = align_items(b_items, c_items)
        try:
            compared = paired(b, c) if b else None
        except ValueError:
            compared = None  # malformed records (a character other than 0/1): fall back to the plain difference
        if compared:
            out.update({
                f"{task}_delta_pp": _pp(compared.get("delta")), f"{task}_ci_low_pp": _pp(compared.get("ci_low")),
                f"{task}_ci_high_pp": _pp(compared.get("ci_high")), f"{task}_flip_pct": _pp(compared.get("flip_rate")),
                f"{task}_mcnemar_p": num(compared.get("mcnemar_p")), f"{task}_paired_n": num(compared.get("n")),
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


def memory_flags(r: ResultLike) -> Dict[str, Any]:
    """What the method quantized (percent of parameters and of bytes) and the two memory warnings, computed
    from the figures so that results written before the cell warned about them are flagged too."""
    res = typed(r)
    mem = memory_of(res) or Memory()
    ratio = num(mem.weight_measured_over_analytic)
    frac = num(mem.decoder_unquantized_fraction)
    bits, dtype_bits = num(mem.bits_per_weight_quantized), 8 * DTYPE_BYTES.get(_dtype(res), 99)
    quantizes = bits is not None and bits < dtype_bits - 1e-6
    qp, qb = num(mem.quantized_params_fraction), num(mem.quantized_bytes_fraction)
    return {
        "quantized_params_pct": None if qp is None else 100 * qp,
        "quantized_bytes_pct": None if qb is None else 100 * qb,
        "decoder_unquantized_pct": None if frac is None else 100 * frac,
        "unquantized_high": quantizes and frac is not None and frac > UNQUANTIZED_WARN_FRACTION,
        "weight_ratio": ratio,
        "weight_ratio_off": ratio is not None and not RATIO_BAND[0] <= ratio <= RATIO_BAND[1],
    }


def _tps(fig: Optional[DecodeFigure]) -> Dict[str, Optional[float]]:
    return dist_stats(fig.tokens_per_s if fig else None)


def summary_rows(results: Sequence[ResultLike]) -> List[Dict[str, Any]]:
    """One dict per cell (= model x method) with the numbers of the summary table, raw (not formatted)."""
    typed_results = [typed(r) for r in results]
    base = baseline_method(typed_results)
    bases = baseline_cells(typed_results, base)
    paired = load_paired_compare()
    tasks = sweep_tasks(typed_results)
    rows = []
    for res in _ordered(typed_results, base):
        b = bases.get(str(res.model))
        wb, bw = weight_bytes(res), (weight_bytes(b) if b else None)
        peak, peak_src = peak_bytes(res)
        pre = first_prefill_bs1(res)
        dec = headline_decode(res)
        eager = _tps(decode_bs1(res, "eager"))
        thr = cv_threshold(res)
        ttft = dist_stats(pre.ttft_ms if pre else None)
        tps = _tps(dec)
        bwf = num(dec.bandwidth_bound_fraction) if dec else None
        bwm = num(dec.measured_bandwidth_bound_fraction) if dec else None
        graph = decode_bs1(res, "graph")
        graph_tps = _tps(graph)
        err = res.error or None
        lat = latency_of(res)
        copy_bw = num(lat.copy_bandwidth.bytes_per_s) if lat and lat.copy_bandwidth else None
        dec_precision = precision_of(dec)
        row = {
            "sweep": res.sweep, "cell": res.cell, "model": res.model, "method": res.method,
            "method_kind": present(res.method_kind), "status": res.status, "is_baseline": res.method == base,
            "random_weights": is_random(res), "device": present(res.device),
            "error_class": present(err.klass) if err else None, "error_type": present(err.type) if err else None,
            # one line even for results written before the cause was extracted (a whole log tail)
            "error_message": cause_line(str(err.message)) if err and err.message else None,
            "error_phase": present(err.phase) if err else None,
            "weights_gb": None if wb is None else wb / GB,
            "compression_x": (bw / wb) if (wb and bw) else None,
            "peak_gb": None if peak is None else peak / GB, "peak_source": peak_src,
            "prefill_prompt_tokens": num(pre.prompt_tokens) if pre else None,
            "ttft_ms": ttft.get("p50", ttft.get("mean")), "ttft_cv": ttft.get("cv"),
            "ttft_cv_high": (ttft.get("cv") or 0) > thr,
            "ttft_ci_pct": ttft.get("ci_half_width_pct"), "ttft_capped": capped(pre),
            "decode_path": present(dec.decode_path) if dec else None,
            "decode_tps": tps.get("p50", tps.get("mean")), "decode_cv": tps.get("cv"),
            "decode_cv_high": (tps.get("cv") or 0) > thr,
            "decode_ci_pct": tps.get("ci_half_width_pct"), "decode_capped": capped(dec),
            "decode_ci_dominated_by": present(dec_precision.dominated_by) if dec_precision else None,
            "decode_eager_tps": eager.get("p50", eager.get("mean")),
            "decode_eager_cv_high": (eager.get("cv") or 0) > thr,
            "decode_eager_ci_pct": eager.get("ci_half_width_pct"),
            "decode_eager_capped": capped(decode_bs1(res, "eager")),
            "decode_graph_tps": graph_tps.get("p50"), "decode_graph_ci_pct": graph_tps.get("ci_half_width_pct"),
            "decode_graph_capped": capped(graph),
            "bw_bound_pct": None if bwf is None else 100 * bwf,
            "bw_measured_pct": None if bwm is None else 100 * bwm,
            "copy_bandwidth_tb_s": None if copy_bw is None else copy_bw / 1e12,
            "quantize_s": num(res.timings.quantize_s) if res.timings else None,
            **memory_flags(res),
            "wall_time_s": num(res.wall_time_s),
            "node": get(res.scheduler, "node"), "slurm_job_id": get(res.scheduler, "job_id"),
            "warnings": [str(w) for w in res.warnings or []],
        }
        for task in tasks:
            row.update(_task_columns(res, task, b, paired))
        row.update(quality_columns(res))
        row["warnings"] += quality_warnings(quality_of(res), row["warnings"])
        rows.append(row)
    return rows


def quality_columns(r: ResultLike) -> Dict[str, Any]:
    """The quality-vs-baseline numbers of one cell (metrics.quality), flat; None where not measured."""
    res = typed(r)
    q = quality_of(res) or Quality()
    c = q.comparison or Comparison()
    kl, top1, ratio = (x or MeanCI() for x in (c.kl_divergence, c.top1_agreement_pct, c.ppl_ratio))
    dp = c.delta_p_pct or DeltaP()
    acc = accuracy_of(res)
    ppl_eval = acc.perplexity if acc else None
    return {
        "ppl": num(q.ppl), "ppl_ci_low": num(q.ppl_ci95_low), "ppl_ci_high": num(q.ppl_ci95_high),
        "ppl_ratio": num(ratio.mean), "ppl_ratio_ci_low": num(ratio.ci95_low),
        "ppl_ratio_ci_high": num(ratio.ci95_high),
        "kl_mean": num(kl.mean), "kl_ci_low": num(kl.ci95_low), "kl_ci_high": num(kl.ci95_high),
        "kl_median": num(kl.p50), "kl_p99": num(kl.p99), "kl_max": num(kl.max),
        "top1_pct": num(top1.mean), "top1_ci_low": num(top1.ci95_low),
        "top1_ci_high": num(top1.ci95_high),
        "dp_rms_pct": num(dp.rms),
        "quality_tokens": num(kl.n_tokens or q.n_tokens),
        "quality_source": present(q.comparison_source),
        "quality_role": present(q.role),
        "perplexity_eval": num(ppl_eval.value) if ppl_eval else None,
        **kept_mass_columns(q),
        "quality_batch_size": num(q.settings.batch_size) if q.settings else None,
        "quality_nonfinite": "; ".join(quality_nonfinite(q)) or None,
    }


def kept_mass_columns(q: Optional[Quality]) -> Dict[str, Any]:
    """How much probability the cell's stored distributions keep exactly: the minimum over positions, the coverage
    it was meant to reach, and whether a cap cut below it (then the KL bound of docs/results.md#quality fails)."""
    kept_min = num(q.kept_mass_min) if q else None
    coverage = num(q.settings.coverage) if q and q.settings else None
    low = kept_min is not None and coverage is not None and kept_min < coverage - KEPT_MASS_TOLERANCE
    return {"kept_mass_min": kept_min, "kept_coverage": coverage, "kept_mass_low": low}


# float64 sums of fp32 probabilities: below coverage by more than this, a cap cut (qbench/evaluate/quality.py)
KEPT_MASS_TOLERANCE = 1e-6


def quality_nonfinite(q: Optional[Quality]) -> List[str]:
    """Why the cell's quality figures are not finite, one line each (``quality: <figure> not finite: <why>``).

    The store writes NaN as null, so a null perplexity or KL of a cell that measured quality is a non-finite
    figure: the cell's own reason where it recorded one (``nonfinite``), else a line saying none was recorded."""
    if not q or q.role not in ("baseline", "compared"):
        return []
    recorded: Dict[str, Any] = q.nonfinite if isinstance(q.nonfinite, dict) else {}
    c = q.comparison or None
    if c is not None and isinstance(c.nonfinite, str):
        recorded = {**recorded, "kl": c.nonfinite}
    out = [f"quality: {k} not finite: {why}" for k, why in recorded.items() if isinstance(why, str)]
    if "ppl" not in recorded and num(q.ppl) is None:
        out.append("quality: ppl not finite (stored as null; the result records no reason)")
    if c is not None and "kl" not in recorded and (num(c.kl_divergence.mean) if c.kl_divergence else None) is None:
        out.append("quality: kl not finite (stored as null; the result records no reason)")
    return out


def quality_warnings(q: Optional[Quality], have: List[str]) -> List[str]:
    """The quality lines a cell's warnings should hold and do not yet (results written before the cell wrote
    them, or figures computed at report time): non-finite figures and a kept mass below its coverage."""
    lines = quality_nonfinite(q)
    kept = kept_mass_columns(q)
    if kept["kept_mass_low"] and not any("max_kept" in w for w in have):
        lines.append(f"quality: stored distributions keep mass down to {kept['kept_mass_min']:.4f} < coverage "
                     f"{kept['kept_coverage']:g} (eval.quality.max_kept cut them): KL is a looser lower bound there")
    return [w for w in lines if w not in have]


def summary_table(results: Sequence[ResultLike]) -> pd.DataFrame:
    return pd.DataFrame(summary_rows(results))


# ---------------------------------------------------------------- tidy


def _cell_context(res: Result) -> Dict[str, Any]:
    return {"sweep": res.sweep, "cell": res.cell, "model": res.model, "method": res.method,
            "method_kind": present(res.method_kind), "status": res.status,
            "error_class": present(res.error.klass) if res.error else None,
            "random_weights": is_random(res), "device": present(res.device)}


def _tidy_cell(r: ResultLike) -> List[Dict[str, Any]]:
    res = typed(r)
    ctx = _cell_context(res)
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
                 "value": num(res.wall_time_s), "unit": "s"})
    for k, v in (res.timings.to_dict() if res.timings else {}).items():
        if k == "budget" and isinstance(v, dict):  # where the cell's seconds went: one row per part
            for part, seconds in v.items():
                add("run", f"timings.budget.{part}", seconds, "s")
            continue
        add("run", f"timings.{k}", v, "s" if k.endswith("_s") else None)

    mem = memory_of(res) or Memory()
    for k in ("weight_bytes_measured", "weight_bytes_get_memory_footprint", "weight_bytes_analytic",
              "rss_peak_bytes"):
        add("memory", k, getattr(mem, k), "bytes")
    add("memory", "weight_measured_over_analytic", mem.weight_measured_over_analytic, "ratio")
    add("memory", "bits_per_weight_quantized", mem.bits_per_weight_quantized, "bits")
    add("memory", "params_total", mem.params_total, "count")
    add("memory", "params_quantized", mem.params_quantized, "count")
    add("memory", "params_quantized_measured", mem.params_quantized_measured, "count")
    add("memory", "weight_bytes_quantized_measured", mem.weight_bytes_quantized_measured, "bytes")
    for k in ("quantized_params_fraction", "quantized_bytes_fraction", "decoder_unquantized_fraction"):
        add("memory", k, getattr(mem, k), "fraction")
    for k in ("peak_allocated_bytes", "peak_reserved_bytes", "nvml_used_bytes"):
        per_phase = getattr(mem, k)
        if isinstance(per_phase, dict):
            for phase, v in per_phase.items():
                add("memory", k, v, "bytes", phase=phase)
        else:
            add("memory", k, per_phase, "bytes")
    for kv in mem.kv_cache_bytes_analytic or []:
        add("memory", "kv_cache_bytes_analytic", kv.bytes if isinstance(kv, KvShape) else None, "bytes",
            batch_size=present(kv.batch_size) if isinstance(kv, KvShape) else None,
            seq_len_tokens=present(kv.seq_len_tokens) if isinstance(kv, KvShape) else None)

    for p in prefill_rows(res):
        shape: Dict[str, Any] = {"batch_size": present(p.batch_size), "prompt_tokens": present(p.prompt_tokens)}
        add_dist("latency", "prefill.ttft_ms", p.ttft_ms, "ms", **shape)
        add_dist("latency", "prefill.tokens_per_s", p.tokens_per_s, "tokens/s", **shape)
        add("latency", "prefill.compute_bound_fraction", p.compute_bound_fraction, "fraction", **shape)
    for d in decode_rows(res):
        dshape: Dict[str, Any] = {"batch_size": present(d.batch_size), "prompt_tokens": present(d.prompt_tokens),
                  "new_tokens": present(d.new_tokens), "decode_path": present(d.decode_path)}
        add_dist("latency", "decode.tokens_per_s", d.tokens_per_s, "tokens/s", **dshape)
        add_dist("latency", "decode.per_token_ms", d.per_token_ms, "ms", **dshape)
        add("latency", "decode.bandwidth_bound_tokens_per_s", d.bandwidth_bound_tokens_per_s, "tokens/s", **dshape)
        add("latency", "decode.bandwidth_bound_fraction", d.bandwidth_bound_fraction, "fraction", **dshape)
        add("latency", "decode.measured_bandwidth_bound_fraction", d.measured_bandwidth_bound_fraction,
            "fraction", **dshape)
        add("latency", "decode.capped", float(capped(d)) if precision_of(d) else None, "bool", **dshape)
        add("latency", "decode.energy_j_per_token", d.energy_j_per_token, "J/token", **dshape)
    lat = latency_of(res)
    for k, v in (lat.one_time.to_dict() if lat and lat.one_time else {}).items():
        add("latency", f"one_time.{k}", v, "s" if k.endswith("_s") else None)

    rows += _accuracy_tidy(res, ctx)
    rows += _quality_tidy(res, ctx)
    return rows


def _accuracy_tidy(res: Result, ctx: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The accuracy figures of one cell as tidy rows: per task its headline first (``<task>.<metric>``), every
    other metric lm-eval reported, stderr, timing and MMLU's categories; then perplexity."""
    rows: List[Dict[str, Any]] = []

    def add(metric: str, value: Any, unit: str, **extra: Any) -> None:
        if num(value) is not None:
            rows.append({**ctx, "group": "accuracy", "metric": metric, "stat": "value", "value": num(value),
                         "unit": unit, **extra})

    acc = accuracy_of(res)
    for task, t in (acc.tasks or {} if acc else {}).items():
        if not isinstance(t, TaskScore):
            continue
        ctx_t = {"task": task, "num_fewshot": present(t.num_fewshot), "limit": num(t.limit),
                 "n_items": present(t.n_items)}
        metric, score = task_headline(t, task)
        add(f"{task}.{metric or 'value'}", score, "fraction", **ctx_t)
        metrics = t.metrics if isinstance(t.metrics, dict) else {}
        for mk, mv in metrics.items():
            if not task_table.same_metric(mk, metric):
                add(f"{task}.{mk}", mv, "fraction", **ctx_t)
        stderrs = t.stderrs if isinstance(t.stderrs, dict) else {}
        own = task_table.same_metric(metric, t.metric if isinstance(t.metric, str) else None)
        add(f"{task}.stderr", t.stderr if own else stderrs.get(metric or ""), "fraction", **ctx_t)
        add(f"{task}.eval_time_s", t.eval_time_s, "s", **ctx_t)
        add(f"{task}.items_per_s", t.items_per_s, "items/s", **ctx_t)
        for cat, cv in (t.categories or {}).items() if isinstance(t.categories, dict) else []:
            add(f"{task}.category", category_score(cv), "fraction", category=cat, **ctx_t)
    ppl = acc.perplexity if acc else None
    if ppl:
        add("perplexity", ppl.value, "perplexity", seq_len_tokens=present(ppl.seq_len_tokens),
            task=str(ppl.source) if ppl.source else None)
    return rows


def _quality_tidy(res: Result, ctx: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The quality figures of one cell as tidy rows (corpus in ``task``, window length in ``seq_len_tokens``)."""
    q = quality_columns(res)
    settings = (quality_of(res) or Quality()).settings or None
    extra = {"seq_len_tokens": present(settings.ctx_tokens) if settings else None,
             "task": present(settings.source) if settings else None}
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


def tidy_table(results: Sequence[ResultLike]) -> pd.DataFrame:
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


def write_tables(results: Sequence[ResultLike], out_dir: Path) -> Dict[str, Path]:
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


def decode_gap_rows(results: Sequence[ResultLike]) -> List[Dict[str, Any]]:
    """Where decode time goes, per ok cell and batch size that measured the graph path: the bound from the card's
    measured copy bandwidth (datasheet's where none was measured), what the compiled step alone reaches (graph:
    the kernels' share of the gap), what generate around the same step reaches (static: generate's share), and
    the eager generate users of the plain API get. Each speed is tokens/s (p50) with its CI half-width."""
    rows = []
    for r in results:
        res = typed(r)
        if res.status != "ok":
            continue
        by_path: Dict[Any, Dict[Any, DecodeFigure]] = {}
        for d in decode_rows(res):
            by_path.setdefault(present(d.batch_size), {})[present(d.decode_path)] = d
        for batch, paths in sorted(by_path.items(), key=lambda kv: kv[0] or 0):
            graph = paths.get("graph")
            if graph is None:
                continue
            measured = num(graph.measured_bandwidth_bound_tokens_per_s)
            bound = measured if measured is not None else num(graph.bandwidth_bound_tokens_per_s)
            row: Dict[str, Any] = {
                "cell": res.cell, "model": res.model, "method": res.method, "batch_size": batch, "bound_tps": bound,
                "bound_source": "measured copy bandwidth" if measured is not None else "datasheet"}
            for path in decode_paths.names():
                st = _tps(paths.get(path))
                row[f"{path}_tps"], row[f"{path}_ci_pct"] = st.get("p50"), st.get("ci_half_width_pct")
                p50 = st.get("p50")
                row[f"{path}_pct_of_bound"] = 100 * p50 / bound if bound and p50 else None
            g, st_ = row["graph_tps"], row["static_tps"]
            row["generate_keeps_pct"] = 100 * st_ / g if g and st_ else None
            rows.append(row)
    return rows
