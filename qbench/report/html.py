"""Renders a sweep's HTML page and the reports index.

Self-contained by default: plotly.js is embedded once in a <script>; each figure travels as JSON inside
<script type="application/json"> and is drawn by Plotly.newPlot. No CDN, no fetch: the page opens from
file:// and copies to any static host. A site of many sweeps (qbench-report --all, qbench.report.site) shares one
copy instead: each page loads ``../assets/plotly.min.js`` by a relative <script src>, still from file://.

Safety: jinja2 autoescapes every string from the results; the figure JSON is made inert inside <script> by
escaping '<', '>' and '&' as \\u003c / \\u003e / \\u0026 (valid JSON, and no '</script>' can close the tag).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union
from urllib.parse import quote

import jinja2
import plotly.io as pio
from plotly.offline import get_plotlyjs

from qbench.evaluate import tasks as task_table
from qbench.measure import decode_paths
from qbench.report import charts as C
from qbench.report import decision as D
from qbench.report import tables as T
from qbench.report import time_budget
from qbench.store.result import DecodeFigure, PrefillFigure, Result, TaskScore, Unsupported

TEMPLATE = "template.html.j2"
DECISION_JS = Path(__file__).with_name("decision.js")  # the decision panel's script, inlined into every page
DAGGER, DOUBLE_DAGGER, WARN, STAR = "\u2020", "\u2021", "\u26a0", "\u2605"
MINUS = "\u2212"
ERROR_ROW_CHARS = 200  # an error in the summary's notes column: one line, not a screen


def script_json(obj: Any) -> str:
    """JSON that is safe to paste between <script> tags: nothing in it can end the tag or open a comment."""
    s = obj if isinstance(obj, str) else json.dumps(obj, allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


# ---------------------------------------------------------------- number formatting


def fmt_num(x: Any, digits: int = 1, signed: bool = False) -> str:
    v = T.num(x)
    if v is None:
        return "\u2014"
    if v != 0 and round(v, digits) == 0:
        s = f"{v:+.2g}" if signed else f"{v:.2g}"  # a tiny model's 0.0021 GB must not print as 0.00
        return s.replace("-", MINUS)
    s = f"{v:+,.{digits}f}" if signed else f"{v:,.{digits}f}"
    return s.replace("-", MINUS)


# ---------------------------------------------------------------- summary table


def _columns(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Column specs: header, unit, key in the summary row, digits, which way is better ("high"/"low")."""
    prompt = {r["prefill_prompt_tokens"] for r in rows if T.num(r.get("prefill_prompt_tokens")) is not None}
    ttft_unit = f"ms, p50, bs 1, {int(next(iter(prompt)))} tok" if len(prompt) == 1 else "ms, p50, bs 1"
    paths = sorted({r["decode_path"] for r in rows if r.get("decode_path")}, key=lambda p: p != "static")
    lead = " where measured, else ".join(paths) if len(paths) > 1 else (paths[0] if paths else "eager")
    cols: List[Dict[str, Any]] = [
        {"key": "weights_gb", "head": "Weights", "unit": "GB", "digits": 2, "better": "low", "warn": "weight_ratio_off"},
        {"key": "quantized_params_pct", "head": "Quantized", "unit": "% of weights: params (bytes)", "digits": 1,
         "better": None, "also": "quantized_bytes_pct", "warn": "unquantized_high"},
        {"key": "compression_x", "head": "Compression", "unit": "\u00d7 vs baseline", "digits": 2, "better": "high"},
        {"key": "peak_gb", "head": "Peak memory", "unit": "GB", "digits": 2, "better": "low"},
        {"key": "ttft_ms", "head": "Prefill TTFT", "unit": f"{ttft_unit} ± 95 % CI", "digits": 1, "better": "low",
         "cv": "ttft_cv_high", "pm": "ttft_ci_pct", "capped": "ttft_capped"},
        {"key": "decode_tps", "head": "Decode bs 1", "unit": f"tokens/s, p50 ± 95 % CI, {lead}", "digits": 1,
         "better": "high", "cv": "decode_cv_high", "path": "decode_path", "pm": "decode_ci_pct",
         "capped": "decode_capped"},
        {"key": "bw_measured_pct", "head": "Decode vs card", "unit": "% of the bound from this card's measured copy "
         "bandwidth, same path", "digits": 1, "better": "high", "cv": "decode_cv_high"},
        {"key": "bw_bound_pct", "head": "Decode vs datasheet", "unit": "% of the datasheet bandwidth bound, same path",
         "digits": 1, "better": "high", "cv": "decode_cv_high"},
    ]
    if "static" in paths:  # the eager figure beside the static one, labelled (where static leads the column)
        cols.insert(cols.index(next(c for c in cols if c["key"] == "bw_measured_pct")),
                    {"key": "decode_eager_tps", "head": "Decode bs 1, eager", "unit": "tokens/s, p50 ± 95 % CI, eager",
                     "digits": 1, "better": "high", "cv": "decode_eager_cv_high", "pm": "decode_eager_ci_pct",
                     "capped": "decode_eager_capped"})
    for task in T.row_tasks(rows):
        label = task_table.label(task)
        cols += [
            {"key": f"{task}_pct", "head": label, "unit": _score_unit(rows, task), "digits": 1, "better": "high",
             "acc": task},
            {"key": f"{task}_delta_pp", "head": f"{label} \u0394", "unit": "pp vs baseline [paired 95 % CI]",
             "digits": 1, "better": "high", "acc": task, "signed": True, "ci": task},
            {"key": f"{task}_flip_pct", "head": f"{label} flips", "unit": "% of paired items", "digits": 1,
             "better": "low", "acc": task},
        ]
    cols.append({"key": "quantize_s", "head": "Quantization", "unit": "s", "digits": 0, "better": "low"})
    # A column nobody measured only adds dashes; the notes under the table say what was not measured.
    return [c for c in cols if any(T.num(r.get(c["key"])) is not None for r in rows)]


def _score_unit(rows: List[Dict[str, Any]], task: str) -> str:
    """'% correct', naming the headline metric where it is not plain accuracy (acc_norm, exact_match, ...)."""
    metrics = {str(r.get(f"{task}_metric")).removesuffix(",none") for r in rows if r.get(f"{task}_metric")}
    return "% correct" + (f", {', '.join(sorted(metrics))}" if metrics - {"acc"} else "")


def _best(rows: List[Dict[str, Any]], col: Dict[str, Any]) -> Set[str]:
    """Cells holding the best value of a column, per model (comparing a 1B with an 8B model says nothing).

    Failed cells and, for accuracy, random-weight cells are not eligible; neither is a baseline's own
    compression of 1x. A column with a single eligible value, or where all tie, marks nothing.
    """
    best: Set[str] = set()
    if col["better"] is None:  # a share, not a figure of merit
        return best
    for model in dict.fromkeys(r["model"] for r in rows):
        cand = [r for r in rows if r["model"] == model and r["status"] == "ok" and T.num(r.get(col["key"])) is not None
                and not (col.get("acc") and r["random_weights"])
                and not (col["key"] == "compression_x" and r["is_baseline"])]
        if len({r[col["key"]] for r in cand}) < 2:
            continue
        pick = max if col["better"] == "high" else min
        v = pick(r[col["key"]] for r in cand)
        best |= {r["cell"] for r in cand if r[col["key"]] == v}
    return best


def _marks(row: Dict[str, Any], col: Dict[str, Any]) -> List[Dict[str, str]]:
    m = []
    task = col.get("acc")
    if task and row["random_weights"]:
        m.append({"sym": DAGGER, "title": "random weights: accuracy at chance, the number means nothing"})
    if task and T.num(row.get(f"{task}_limit")) is not None:
        m.append({"sym": DOUBLE_DAGGER, "title": f"limited evaluation: limit {fmt_num(row[f'{task}_limit'], 2)}, "
                                                 f"{fmt_num(row.get(f'{task}_n'), 0)} items"})
    if col.get("capped") and row.get(col["capped"]):
        m.append({"sym": WARN, "title": "precision target not reached: the figure hit bench.max_time_per_figure_s "
                                        "first (see its ±)"})
    if col.get("cv") and row.get(col["cv"]):
        m.append({"sym": WARN, "title": "coefficient of variation above the sweep's threshold: noisy measurement"})
    if col.get("warn") == "weight_ratio_off" and row.get("weight_ratio_off"):
        m.append({"sym": WARN, "title": f"measured / analytic weight bytes = {fmt_num(row.get('weight_ratio'), 3)}, "
                                        "outside 0.99-1.01: the memory model does not describe this model"})
    if col.get("warn") == "unquantized_high" and row.get("unquantized_high"):
        m.append({"sym": WARN, "title": f"{fmt_num(row.get('decoder_unquantized_pct'), 1)} % of the decoder layers' "
                                        "weights stay unquantized by this method"})
    return m


def summary_view(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    cols = _columns(rows)
    best = {c["key"]: _best(rows, c) for c in cols}
    out_rows = []
    for r in rows:
        cells = []
        for c in cols:
            v = T.num(r.get(c["key"]))
            text = fmt_num(v, c["digits"], c.get("signed", False))
            if c.get("ci"):
                lo, hi = T.num(r.get(f"{c['ci']}_ci_low_pp")), T.num(r.get(f"{c['ci']}_ci_high_pp"))
                if lo is not None and hi is not None:
                    text += f" [{fmt_num(lo, 1, True)}, {fmt_num(hi, 1, True)}]"
                elif v is not None:
                    text += " (no CI)"
            if c["key"] == "peak_gb" and v is not None and r.get("peak_source") == "rss":
                text += " RSS"
            if c["key"] == "compression_x" and r["is_baseline"] and v is not None:
                text = "1.00 (baseline)"
            if c.get("also") and v is not None:
                text += f" ({fmt_num(r.get(c['also']), c['digits'])})"
            if c.get("pm") and v is not None and T.num(r.get(c["pm"])) is not None:
                text += f" ± {fmt_num(v * r[c['pm']] / 100, c['digits'])}"  # the 95 % CI's half-width
            if c.get("path") and v is not None and r.get(c["path"]):
                text += f" {r[c['path']]}"
            is_best = r["cell"] in best[c["key"]]
            cells.append({"text": text, "sort": "" if v is None else repr(v), "best": is_best,
                          "marks": _marks(r, c) if v is not None else []})
        error = None
        if r["status"] == "error":  # one line, cut: the Failed cells section has the whole message and traceback
            error = (f"{r.get('error_type') or 'error'}"
                     f"{' in ' + r['error_phase'] if r.get('error_phase') else ''}: {r.get('error_message') or ''}")
            error = error if len(error) <= ERROR_ROW_CHARS else error[: ERROR_ROW_CHARS - 1] + "\u2026"
        notes = list(r["warnings"])
        for task in T.row_tasks(rows):
            if r.get(f"{task}_delta_source") == "difference":
                notes.append(f"{task_table.label(task)} \u0394 is a plain difference (no per-item pairing)")
        # The error stays in sight; warnings fold away (a sweep's cells carry a dozen) so rows stay one line
        # high, and the honesty panel lists the noisy ones again.
        out_rows.append({"row": r, "cells": cells, "error": error, "notes": notes})
    return {"columns": cols, "rows": out_rows}


# ---------------------------------------------------------------- quality vs baseline


def _with_ci(v: Any, lo: Any, hi: Any, digits: int, sig: bool = False) -> str:
    """'v [lo, hi]' with v formatted to ``digits`` decimals (or significant digits with ``sig``)."""
    if T.num(v) is None:
        return "\u2014"
    f = (lambda x: f"{x:.{digits}g}".replace("-", MINUS)) if sig else (lambda x: fmt_num(x, digits))
    text = f(v)
    if T.num(lo) is not None and T.num(hi) is not None:
        text += f" [{f(lo)}, {f(hi)}]"
    return text


def _weights_origin(res: Result) -> str:
    src: Dict[str, Any] = res.source if isinstance(res.source, dict) else {}
    if T.is_random(res):
        return "random weights"
    if src.get("gguf_file"):
        return (f"real weights from the GGUF file {Path(str(src['gguf_file'])).name} (sha256 "
                f"{str(src.get('gguf_sha256', ''))[:12]}\u2026), dequantized to {src.get('dequantized_dtype')}: the "
                "baseline carries the GGUF's own quantization rounding; comparisons between methods stay valid")
    return f"real weights from {src.get('path') or T.get(res.config, 'model', 'source')}"


def _by_cell(results: Sequence[T.ResultLike]) -> Dict[str, Result]:
    return {str(res.cell): res for res in _typed(results)}


def _typed(results: Sequence[T.ResultLike]) -> List[Result]:
    """Each result.json's typed result (qbench.store.result): what the page reads them through."""
    return [T.typed(r) for r in results]


def quality_view(rows: List[Dict[str, Any]], results: Sequence[T.ResultLike]) -> Dict[str, Any]:
    """The section the page opens with: per cell, quality against its model's baseline, token by token."""
    by_cell = _by_cell(results)
    out: List[Dict[str, Any]] = []
    origins: Dict[str, str] = {}
    settings: Optional[Dict[str, Any]] = None
    for r in rows:
        res = by_cell.get(r["cell"]) or Result()
        if T.num(r.get("ppl")) is None and T.num(r.get("kl_mean")) is None and not r.get("quality_nonfinite"):
            continue  # no quality measured; a cell whose figures are not finite stays, with the reason
        origins.setdefault(r["model"], _weights_origin(res))
        q = T.quality_of(res)
        settings = settings or (q.settings.to_dict() if q and q.settings else None)
        task_cells = []
        for task in T.row_tasks(rows):
            if T.num(r.get(f"{task}_delta_pp")) is None:
                continue
            delta = _with_ci(r[f"{task}_delta_pp"], r.get(f"{task}_ci_low_pp"), r.get(f"{task}_ci_high_pp"), 1)
            flips = T.num(r.get(f"{task}_flip_pct"))
            task_cells.append(f"{task_table.label(task)} {delta} pp" + ("" if flips is None else f", {flips:.1f} % flipped"))
        out.append({
            "row": r,
            "weights": fmt_num(r.get("weights_gb"), 3),
            "ppl": _with_ci(r.get("ppl"), r.get("ppl_ci_low"), r.get("ppl_ci_high"), 3),
            "ppl_ratio": _with_ci(r.get("ppl_ratio"), r.get("ppl_ratio_ci_low"), r.get("ppl_ratio_ci_high"), 4),
            "kl": _with_ci(r.get("kl_mean"), r.get("kl_ci_low"), r.get("kl_ci_high"), 3, sig=True)
                  if T.num(r.get("kl_mean")) is not None or not r.get("quality_nonfinite") else r["quality_nonfinite"],
            "kept_mass": fmt_num(r.get("kept_mass_min"), 4) + (" < coverage" if r.get("kept_mass_low") else ""),
            "kl_tail": "\u2014" if T.num(r.get("kl_median")) is None else
                       f"{r['kl_median']:.3g} / {r['kl_p99']:.3g} / {r['kl_max']:.3g}",
            "top1": _with_ci(r.get("top1_pct"), r.get("top1_ci_low"), r.get("top1_ci_high"), 2),
            "dp_rms": fmt_num(r.get("dp_rms_pct"), 2),
            "accuracy": task_cells,
            "source": {"live": "live", "sweep_end": "from files (sweep end)"}.get(r.get("quality_source") or "",
                                                                             "baseline" if r["is_baseline"] else "pending"),
        })
    return {"rows": out, "origins": origins, "settings": settings or {}}


# ---------------------------------------------------------------- honesty panel


def _cv_findings(res: Result) -> List[str]:
    thr = T.cv_threshold(res)
    found = []
    figures: List[Tuple[str, Union[PrefillFigure, DecodeFigure], List[Tuple[str, Any]]]] = [
        *(("prefill", x, [("ttft_ms", x.ttft_ms), ("tokens_per_s", x.tokens_per_s)]) for x in T.prefill_rows(res)),
        *(("decode", x, [("tokens_per_s", x.tokens_per_s), ("per_token_ms", x.per_token_ms)])
          for x in T.decode_rows(res))]
    for kind, x, dists in figures:
        path = x.decode_path if isinstance(x, DecodeFigure) else None
        for key, dist in dists:
            cv = T.dist_stats(dist).get("cv")
            if cv is not None and cv > thr:
                where = f"{kind} {path or ''} bs={T.present(x.batch_size)}".replace("  ", " ")
                found.append(f"{where} {key}: CV {100 * cv:.1f} % > {100 * thr:.0f} %")
    return found


def _torch_settings(res: Result) -> Dict[str, Any]:
    lat = T.latency_of(res)
    return (lat.torch_settings or {}) if lat else {}


def _reader(where: str, *keys: str) -> Callable[[Result], Any]:
    """A reader of one value: under the cell's environment (untyped: host, versions) or its torch settings."""
    def read(r: Result) -> Any:
        return T.get(r.environment if where == "environment" else _torch_settings(r), *keys)
    return read


def _mixed_environment(results: Sequence[T.ResultLike]) -> List[Dict[str, Any]]:
    """Environment keys whose value differs between cells of the sweep, with the cells per value."""
    typed = _typed(results)
    keys: Dict[str, Callable[[Result], Any]] = {
        "device": lambda r: T.present(r.device),
        "GPU": lambda r: T.get(r.environment, "gpu_name"),
        "GPU count": lambda r: T.get(r.environment, "gpu_count"),
        "driver": lambda r: T.get(r.environment, "driver"),
        "CUDA (torch)": lambda r: T.get(r.environment, "torch_cuda"),
        "qbench commit": lambda r: T.get(r.environment, "qbench_git_commit"),
        "host": lambda r: T.get(r.environment, "host"),
        # cells of one SLURM sweep may run on different nodes (even of one GPU model): flag it
        "node": lambda r: T.get(r.scheduler, "node")}
    libs = sorted({k for r in typed for k in (T.get(r.environment, "versions", default={}) or {})})
    for lib in libs:
        keys[lib] = _reader("environment", "versions", lib)
    # what libraries may switch for one method's cells only (an allocator, Inductor tuning, TF32); a cell that did
    # not record one (no latency section, an older result) says nothing about it and is left out
    recorded: Dict[str, Callable[[Result], Any]] = {
        "PYTORCH_ALLOC_CONF": lambda r: T.get(r.environment, "variables", "PYTORCH_ALLOC_CONF")}
    for key in sorted({k for r in typed for k in _torch_settings(r)}):
        recorded[key] = _reader("torch_settings", key)
    out = []
    for name, f in [*keys.items(), *recorded.items()]:
        by_value: Dict[str, List[str]] = defaultdict(list)
        for r in typed:
            if r.environment and (name not in recorded or f(r) is not None):
                by_value[str(f(r))].append(str(r.cell))
        if len(by_value) > 1:
            out.append({"key": name, "values": [{"value": v, "cells": cells} for v, cells in by_value.items()]})
    return out


def _tasks(res: Result) -> Dict[str, TaskScore]:
    """The cell's task scores (those the typed result could read as such)."""
    acc = T.accuracy_of(res)
    return {task: t for task, t in ((acc.tasks or {}) if acc else {}).items() if isinstance(t, TaskScore)}


def _fewshot(res: Result, task: str) -> str:
    t = _tasks(res).get(task)
    return str(T.present(t.num_fewshot) if t else None)


def _unsupported(res: Result) -> List[Unsupported]:
    lat = T.latency_of(res)
    return [u for u in ((lat.unsupported or []) if lat else []) if isinstance(u, Unsupported)]


def honesty_view(results: Sequence[T.ResultLike], rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    typed = _typed(results)
    random_cells = [r.cell for r in typed if T.is_random(r)]
    limited = []
    fewshot: Dict[str, Counter] = defaultdict(Counter)
    for r in typed:
        for task, t in _tasks(r).items():
            if T.num(t.limit) is not None:
                limited.append({"cell": r.cell, "task": task, "limit": T.present(t.limit),
                                "n_items": T.present(t.n_items)})
            if T.present(t.num_fewshot) is not None:
                fewshot[task][str(t.num_fewshot)] += 1
    fewshot_view = [{"task": task, "shots": dict(c), "mixed": len(c) > 1,
                     "cells": {shot: [r.cell for r in typed if _fewshot(r, task) == shot] for shot in c}}
                    for task, c in sorted(fewshot.items())]
    noisy = []
    for r in typed:
        found = list(dict.fromkeys([str(w) for w in r.warnings or []] + _cv_findings(r)))
        if found:
            noisy.append({"cell": r.cell, "items": found})
    unsupported = [{"cell": r.cell, "path": T.present(u.decode_path), "reason": T.present(u.reason)}
                   for r in typed for u in _unsupported(r)]
    not_run = [x for x in (_compiled_not_run(r) for r in typed) if x]
    no_pairing = [f"{r['cell']} ({task_table.label(t)})" for r in rows for t in T.row_tasks(rows)
                  if r.get(f"{t}_delta_source") == "difference"]
    schema = sorted({str(T.present(r.schema_version)) for r in typed} - {"1"})
    memory = [{"cell": r["cell"], "ratio": fmt_num(r.get("weight_ratio"), 3) if r.get("weight_ratio_off") else None,
               "unquantized": fmt_num(r.get("decoder_unquantized_pct"), 1) if r.get("unquantized_high") else None}
              for r in rows if r.get("weight_ratio_off") or r.get("unquantized_high")]
    return {"random": random_cells, "limited": limited, "fewshot": fewshot_view, "noisy": noisy,
            "mixed": _mixed_environment(typed), "same_environment": _same_environment_text(typed),
            "memory": memory, "unsupported": unsupported, "not_run": not_run, "no_pairing": no_pairing,
            "schema": schema, "paired_available": T.load_paired_compare() is not None}


def _compiled_not_run(res: Result) -> Optional[Dict[str, Any]]:
    """Where a cell ran its compiled decode paths at some of its batch sizes only (bench.compiled_batch_sizes):
    their figures are absent at the others by choice, which the tables alone would not tell from a failure.
    None where every batch size ran them, or where the method never runs them (listed as unsupported)."""
    lat = T.latency_of(res)
    settings = (lat.settings or None) if lat else None
    batches = (settings.batch_sizes or []) if settings else []
    compiled = T.present(settings.compiled_batch_sizes) if settings else None
    never = {T.present(u.decode_path) for u in _unsupported(res) if T.present(u.batch_size) is None}
    paths = [p for p in ((settings.decode_paths or []) if settings else [])
             if decode_paths.compiled(p) and p not in never]
    skipped = [b for b in batches if compiled is not None and b not in compiled]
    if not paths or not skipped or compiled is None:
        return None
    return {"cell": res.cell, "paths": paths, "compiled": list(compiled), "skipped": skipped}


def _same_environment_text(results: Sequence[T.ResultLike]) -> str:
    """What "nothing mixed" means for this sweep: a CPU sweep has no GPU, driver or CUDA to be the same."""
    ran = [r for r in _typed(results) if r.environment]
    gpu = any(r.device == "cuda" or T.get(r.environment, "gpu_name") for r in ran)
    if gpu:
        return "Every cell ran on the same GPU, driver, CUDA and library versions."
    return "Every cell ran on the CPU of the same host, with the same library versions (no GPU in this sweep)."


# ---------------------------------------------------------------- environment and provenance


def environment_view(results: Sequence[T.ResultLike]) -> Dict[str, Any]:
    typed = _typed(results)
    libs = sorted({k for r in typed for k in (T.get(r.environment, "versions", default={}) or {})})
    scheduled = any(r.scheduler for r in typed)  # SLURM columns only where a cell ran as a job
    head = ["cell", "device", "GPU", "driver", "CUDA", *libs, "qbench commit", "host", "python",
            *(["node", "SLURM job"] if scheduled else [])]
    body = []
    for r in typed:
        e: Dict[str, Any] = r.environment or {}
        v = e.get("versions") or {}
        s: Dict[str, Any] = r.scheduler or {}
        body.append([r.cell, T.present(r.device), e.get("gpu_name"), e.get("driver"), e.get("torch_cuda"),
                     *[v.get(lib) for lib in libs], e.get("qbench_git_commit"), e.get("host"), e.get("python"),
                     *([s.get("node"), s.get("job_id")] if scheduled else [])])
    text = [["\u2014" if x is None else str(x) for x in row] for row in body]
    commands = list(dict.fromkeys(str(r.command) for r in typed if r.command))
    cells = []
    for r in typed:
        cal = T.get(r.method_info, "calibration")
        cells.append({
            "cell": r.cell, "status": r.status, "overrides": " ".join(str(o) for o in r.overrides or []),
            "started_at": T.present(r.started_at), "finished_at": T.present(r.finished_at),
            "calibration": None if cal is None else json.dumps(cal, indent=2, sort_keys=True, default=str),
            "config": json.dumps(T.present(r.config), indent=2, sort_keys=True, default=str),
            "method_info": json.dumps(r.method_info or {}, indent=2, sort_keys=True, default=str),
            "source": json.dumps(r.source or {}, indent=2, sort_keys=True, default=str),
            "timings": json.dumps(r.timings.to_dict() if r.timings else {}, sort_keys=True, default=str),
        })
    return {"head": head, "body": text, "commands": commands, "cells": cells}


# ---------------------------------------------------------------- page


def figure_json(fig: Any) -> str:
    """The figure as JSON for Plotly.newPlot, made inert inside <script>."""
    return script_json(pio.to_json(fig, validate=False, remove_uids=True))


def sweep_meta(results: Sequence[T.ResultLike], sweep: str) -> Dict[str, Any]:
    typed = _typed(results)
    return {"sweep": sweep, "n_cells": len(typed), "n_ok": sum(r.status == "ok" for r in typed),
            "n_error": sum(r.status == "error" for r in typed),
            "models": list(dict.fromkeys(r.model for r in typed)),
            "methods": list(dict.fromkeys(r.method for r in typed)),
            "demo": any(T.is_demo(r) for r in typed), "random": sum(T.is_random(r) for r in typed),
            "ran": _ran(typed), "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _ran(results: Sequence[T.ResultLike]) -> Optional[str]:
    """When the sweep's cells ran, as dates (UTC): '2026-12-01', or '2026-11-23 to 2026-11-27'; None if unknown."""
    days = sorted({str(t)[:10] for r in _typed(results) for t in (r.started_at, r.finished_at)
                   if isinstance(t, str) and len(t) >= 10})
    if not days:
        return None
    return days[0] if days[0] == days[-1] else f"{days[0]} to {days[-1]}"


def decode_gap_view(results: Sequence[T.ResultLike]) -> List[Dict[str, Any]]:
    """The decode gap table's rows, formatted: 'tokens/s ± CI (x % of bound)' per path (``paths``, by name)."""
    out = []
    for g in T.decode_gap_rows(results):
        cells = {}
        for path in decode_paths.names():
            v = g[f"{path}_tps"]
            text = fmt_num(v, 1)
            if v is not None and g[f"{path}_ci_pct"] is not None:
                text += f" ± {fmt_num(v * g[f'{path}_ci_pct'] / 100, 1)}"
            if g[f"{path}_pct_of_bound"] is not None:
                text += f" ({fmt_num(g[f'{path}_pct_of_bound'], 0)} %)"
            cells[path] = text
        out.append({"cell": g["cell"], "batch_size": g["batch_size"], "bound": fmt_num(g["bound_tps"], 0),
                    "bound_source": g["bound_source"], "paths": cells,
                    "generate_keeps": fmt_num(g["generate_keeps_pct"], 0)})
    return out


def decision_view(rows: List[Dict[str, Any]], results: Sequence[T.ResultLike]) -> Dict[str, Any]:
    """The decision panel: its data (embedded as JSON for the page's script), the answer under the default
    budget (the browser check holds the script to it), and which budget fields any model can judge."""
    data = D.add_text(D.decision_data(rows, results))
    expected = [json.dumps(D.decide(m, data["budget"]), sort_keys=True) for m in data["models"]]
    return {"data": data, "json": script_json(data), "expected": expected,
            "measured": {"kl": any(m["measured"]["kl"] for m in data["models"]),
                         "ppl_ratio": any(m["measured"]["ppl_ratio"] for m in data["models"]),
                         "acc": any(m["measured"]["acc"] for m in data["models"])}}


def sweep_context(results: Sequence[T.ResultLike], sweep: str, downloads: Optional[Dict[str, str]] = None,
                  plotlyjs: Optional[str] = None, plotly_src: Optional[str] = None) -> Dict[str, Any]:
    """Everything the page template shows. ``plotlyjs`` overrides the embedded library (tests only);
    ``plotly_src`` loads it from that relative path instead of embedding it (a site's shared asset)."""
    results = _typed(results)  # each result.json read once, through its typed result
    rows = T.summary_rows(results)
    charts = C.build_charts(rows, results) + time_budget.charts(results)  # "Where the time went", if budgeted
    base = T.baseline_method(results)
    configured = T.configured_baseline(results)
    models_without_base = [m for m in dict.fromkeys(r.model for r in results)
                           if m not in T.baseline_cells(results, base)]
    errors = [{"cell": r.cell, **(r.error.to_dict() if r.error else {})} for r in results if r.status == "error"]
    measured = {
        "accuracy": any(_tasks(r) for r in results),
        "latency": any(T.decode_rows(r) or T.prefill_rows(r) for r in results),
    }
    ctx: Dict[str, Any] = {
        "meta": sweep_meta(results, sweep),
        "demo_cells": [r.cell for r in results if T.is_demo(r)],
        "baseline": base, "configured_baseline": configured, "models_without_base": models_without_base,
        "summary": summary_view(rows), "quality": quality_view(rows, results), "errors": errors,
        "decision": decision_view(rows, results), "decision_js": DECISION_JS.read_text(encoding="utf-8"),
        "decode_gap": decode_gap_view(results),
        # the gap table's path columns: nearest the bound first (the compiled step alone, then what wraps it)
        "decode_gap_paths": [{"name": p, "label": decode_paths.label(p), "description": decode_paths.get(p).DESCRIPTION}
                             for p in reversed(decode_paths.names())],
        "measured": measured,
        "charts": [{**c, "json": figure_json(c["figure"]) if c["figure"] is not None else None} for c in charts],
        "honesty": honesty_view(results, rows), "env": environment_view(results),
        "downloads": downloads or {}, "several_models": len({r.model for r in results}) > 1,
        "sym": {"dagger": DAGGER, "ddagger": DOUBLE_DAGGER, "warn": WARN, "star": STAR},
        "plotly_src": plotly_src,
        "plotlyjs": "" if plotly_src else (plotlyjs if plotlyjs is not None else get_plotlyjs()),
    }
    ctx["meta"]["n_charts"] = sum(c["json"] is not None for c in ctx["charts"])
    return ctx


def render_sweep(results: Sequence[T.ResultLike], sweep: str, downloads: Optional[Dict[str, str]] = None,
                 plotlyjs: Optional[str] = None) -> str:
    """The sweep page as one HTML string."""
    return render_context(sweep_context(results, sweep, downloads, plotlyjs))


def render_context(ctx: Dict[str, Any]) -> str:
    # plotly.js is inserted raw (|safe in the template): it is the library's own code, never result data.
    return _env().get_template(TEMPLATE).render(**ctx)


INDEX_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>qbench reports</title>
<style>
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1a1a1a;
 max-width:1100px;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:.4rem .6rem;text-align:left;
 vertical-align:top}th{background:#f3f3f3}.tag{font-size:.8em;border-radius:3px;padding:0 .3em;background:#fde7c8}
.err{color:#a33a00}.muted{color:#666}.date{white-space:nowrap}
</style></head><body>
<h1>qbench reports</h1>
<p class="muted">{{ sweeps|length }} sweep(s), {{ sweeps|sum(attribute="n_cells") }} cells; rebuilt {{ built_at }}.
"Least memory" is each report's decision panel under its default quality budget (open the report to change it).</p>
{% if sweeps %}
<table id="sweeps"><thead><tr><th>sweep</th><th>ran<span class="muted"> (UTC)</span></th><th>cells</th><th>models</th>
<th>methods</th><th>least memory within the default budget</th><th>report built</th></tr></thead><tbody>
{% for s in sweeps %}<tr>
<td><a href="{{ s.href }}">{{ s.sweep }}</a>{% if s.demo %} <span class="tag">demo</span>{% endif %}</td>
<td class="date">{{ s.get("ran") or "?" }}</td>
<td>{{ s.n_ok }} ok{% if s.n_error %}, <span class="err">{{ s.n_error }} failed</span>{% endif %}
{% if s.random %}<br><span class="muted">{{ s.random }} on random weights</span>{% endif %}</td>
<td>{{ s.models|join(", ") }}</td><td>{{ s.methods|join(", ") }}</td>
<td>{% for model, picks in (s.get("least_memory") or {}).items() %}
{% if s.models|length > 1 %}{{ model }}: {% endif %}{{ picks|join(" = ") if picks else "none" }}
{% if not loop.last %}<br>{% endif %}{% else %}&mdash;{% endfor %}</td>
<td class="muted date">{{ s.built_at[:16]|replace("T", " ") }}</td>
</tr>{% endfor %}
</tbody></table>
{% else %}<p>No sweep reports yet: run <code>qbench-report runs/&lt;sweep&gt;</code>.</p>{% endif %}
</body></html>
"""


def render_index(sweeps: List[Dict[str, Any]]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(INDEX_TEMPLATE).render(
        sweeps=sweeps, built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def write_index(out_root: Path) -> Path:
    """reports/index.html from every reports/<sweep>/report.json (the metadata each sweep build leaves)."""
    out_root = Path(out_root)
    sweeps = []
    for meta_path in sorted(out_root.glob("*/report.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (meta_path.parent / "index.html").exists():
            # quote the directory name for the href: it comes from the file system
            sweeps.append({**meta, "href": quote(meta_path.parent.name) + "/index.html"})
    out_root.mkdir(parents=True, exist_ok=True)
    path = out_root / "index.html"
    path.write_text(render_index(sweeps), encoding="utf-8")
    return path


def _checked(r: Dict[str, Any], sweep: str) -> Dict[str, Any]:
    """The result itself if a report of it alone builds, else its "unreadable" stand-in with the reason."""
    try:
        render_context(sweep_context([r], sweep, plotlyjs=""))
        T.tidy_table([r])
        return r
    except Exception as e:  # whatever a badly shaped file trips over: the reason goes into the row
        stand_in = T.unreadable(Path(r.get("_path") or r["cell"]), f"{type(e).__name__}: {e}")
        return {**stand_in, **{k: r[k] for k in ("cell", "model", "method", "sweep", "_path")}}


def _page(results: List[Dict[str, Any]], sweep: str, out_dir: Path, plotlyjs: Optional[str],
          plotly_src: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
    paths = T.write_tables(results, out_dir)
    downloads = {"tidy table (CSV)": paths["tidy_csv"].name, "tidy table (Parquet)": paths["tidy_parquet"].name,
                 "summary (CSV)": paths["summary_csv"].name}
    ctx = sweep_context(results, sweep, downloads, plotlyjs=plotlyjs, plotly_src=plotly_src)
    return ctx, render_context(ctx)


def build_sweep_report(sweep_dir: Path, out_root: Path, plotlyjs: Optional[str] = None,
                       plotly_src: Optional[str] = None) -> Path:
    """reports/<sweep>/{index.html, results_tidy.csv, results_tidy.parquet, summary.csv, report.json}, then
    reports/index.html. Returns the sweep page's path. Raises FileNotFoundError for a sweep with no result.
    ``plotly_src``: load plotly.js from this path relative to the page (qbench.report.site writes it) instead
    of embedding it.

    One result the report cannot digest (load_results catches the wrong types it knows of; this catches the
    rest) becomes an "unreadable" row with the reason, and the other cells still make the page."""
    sweep_dir = Path(sweep_dir)
    results = T.load_results(sweep_dir)
    if not results:
        raise FileNotFoundError(f"{sweep_dir}: no */result.json found")
    sweep = sweep_dir.resolve().name
    out_dir = Path(out_root) / sweep
    try:
        ctx, text = _page(results, sweep, out_dir, plotlyjs, plotly_src)
    except Exception:
        ctx, text = _page([_checked(r, sweep) for r in results], sweep, out_dir, plotlyjs, plotly_src)
    page = out_dir / "index.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(page)  # a reader never sees half a page
    meta = {**ctx["meta"], "least_memory": {m["model"]: D.decide(m, D.DEFAULT_BUDGET)["memory"]
                                            for m in ctx["decision"]["data"]["models"]}}
    (out_dir / "report.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    write_index(Path(out_root))
    return page
