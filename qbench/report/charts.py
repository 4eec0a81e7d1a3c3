"""The report's plotly figures, built from the summary rows and the results.

Every function returns a Figure, or None when the sweep did not measure what the chart needs: the page
then says "not measured in this sweep" instead of drawing an empty frame.

Plotly renders its label strings as a small subset of HTML, so every string that comes from a result
(model and method names above all) is html-escaped before it goes into a figure (``esc``).
"""
from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qbench.evaluate import tasks as task_table
from qbench.measure import decode_paths
from qbench.report import tables as T

# Okabe & Ito (2008), colour-blind safe; yellow last because it is faint on white paper.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
MEMORY_COLOURS = {"weights": "#0072B2", "KV cache": "#E69F00", "overhead": "#999999"}
# Diverging blue (better) - white - vermillion (worse), both ends from the Okabe-Ito set.
DIVERGING = [[0.0, "#D55E00"], [0.5, "#FFFFFF"], [1.0, "#0072B2"]]
DAGGER, DOUBLE_DAGGER = "\u2020", "\u2021"
FONT = dict(family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif", size=13)
# one marker per task in the delta chart, in the summary's task order (colours: OKABE_ITO in the same order)
TASK_SYMBOLS = ["circle", "diamond", "square", "triangle-up", "x", "star", "hexagon", "cross"]
ROW_HEIGHT_PX = 380


def esc(s: Any) -> str:
    # quote=False: plotly decodes &lt; &gt; &amp; back to text but shows &quot; literally; quotes are inert
    # in plotly labels (no tag, no attribute is parsed without a '<').
    return html.escape(str(s), quote=False)


def label(r: Dict[str, Any], task: Optional[str] = None) -> str:
    """A method's axis / legend label with its caveats: dagger = random weights, double dagger = limited."""
    s = esc(r["method"])
    if r["random_weights"]:
        s += f" {DAGGER}"
    if task and T.num(r.get(f"{task}_limit")) is not None:
        s += f" {DOUBLE_DAGGER}"
    return s


def colours(rows: List[Dict[str, Any]]) -> Dict[str, str]:
    """method -> colour, stable across every chart of the page (baseline first, then sweep order)."""
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: not r["is_baseline"])))
    return {m: OKABE_ITO[i % len(OKABE_ITO)] for i, m in enumerate(methods)}


def models(rows: List[Dict[str, Any]]) -> List[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def fmt(x: Any, digits: int = 2, suffix: str = "") -> str:
    v = T.num(x)
    return "n/a" if v is None else f"{v:,.{digits}f}{suffix}"


def hover_row(r: Dict[str, Any]) -> str:
    """The whole summary row of a cell as hover text (escaped: it is rendered by plotly as HTML)."""
    dag = f" {DAGGER}" if r["random_weights"] else ""
    lines = [f"<b>{esc(r['model'])} / {esc(r['method'])}</b>",
             f"weights {fmt(r['weights_gb'])} GB, {fmt(r['compression_x'])}x vs baseline",
             f"peak memory {fmt(r['peak_gb'])} GB" + (" (RSS)" if r.get("peak_source") == "rss" else ""),
             f"TTFT {fmt(r['ttft_ms'], 1)} ms, decode bs=1 {fmt(r['decode_tps'], 1)} tok/s"
             f" {esc(r.get('decode_path') or '')} ({fmt(r['bw_bound_pct'], 1)} % of bandwidth bound)"]
    if r.get("decode_path") != "eager" and T.num(r.get("decode_eager_tps")) is not None:
        lines.append(f"decode bs=1 eager {fmt(r['decode_eager_tps'], 1)} tok/s")
    for task in T.row_tasks([r]):
        if T.num(r.get(f"{task}_pct")) is None:
            continue
        lim = f" {DOUBLE_DAGGER} {fmt(r[f'{task}_n'], 0)} items" if T.num(r.get(f"{task}_limit")) else ""
        line = f"{esc(task_table.label(task))} {fmt(r[f'{task}_pct'], 1)} %{dag}{lim}"
        if T.num(r.get(f"{task}_delta_pp")) is not None:
            line += f", \u0394 {fmt(r[f'{task}_delta_pp'], 1)} pp{dag}"
            if T.num(r.get(f"{task}_ci_low_pp")) is not None:
                line += f" [{fmt(r[f'{task}_ci_low_pp'], 1)}, {fmt(r[f'{task}_ci_high_pp'], 1)}]"
        lines.append(line)
    if T.num(r.get("kl_mean")) is not None:
        lines.append(f"KL {r['kl_mean']:.3g} nats/token, top-1 agreement {fmt(r.get('top1_pct'), 1)} %, "
                     f"PPL ratio {fmt(r.get('ppl_ratio'), 3)}")
    if T.num(r.get("quantize_s")) is not None:
        lines.append(f"quantization {fmt(r['quantize_s'], 0)} s")
    if r["random_weights"]:
        lines.append(f"{DAGGER} random weights: accuracy at chance")
    return "<br>".join(lines)


def _grid(n_panels: int, titles: List[str]) -> Tuple[go.Figure, int]:
    """One panel per model, three to a row: facets stay readable on a laptop screen."""
    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=0.16 if rows > 1 else 0.1)
    return fig, cols


def _layout(fig: go.Figure, n_rows: int, **kw: Any) -> go.Figure:
    fig.update_layout(template="plotly_white", font=FONT, height=120 + ROW_HEIGHT_PX * n_rows,
                      margin=dict(l=60, r=20, t=50, b=60), hoverlabel=dict(align="left"),
                      legend=dict(orientation="h", yanchor="top", y=-0.14, x=0), **kw)
    return fig


def _or(x: Any, default: float) -> float:
    v = T.num(x)
    return default if v is None else v


def _pos(i: int, cols: int) -> Dict[str, int]:
    return {"row": i // cols + 1, "col": i % cols + 1}


# ---------------------------------------------------------------- Pareto


def pareto_front(points: List[tuple]) -> List[tuple]:
    """Points (x = memory, y = accuracy, ...) that no other point beats on both: less memory and more accuracy."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def score_axis(rows: List[Dict[str, Any]], task: str) -> str:
    """'<label> accuracy (%)', naming the headline metric where it is not plain accuracy (acc_norm, exact_match)."""
    metrics = {str(r.get(f"{task}_metric")).removesuffix(",none") for r in rows if r.get(f"{task}_metric")}
    named = f", {', '.join(sorted(metrics))}" if metrics - {"acc"} else ""
    return f"{esc(task_table.label(task))} accuracy (%{esc(named)})"


def _chance_line(fig: go.Figure, rows: List[Dict[str, Any]], task: str, pos: Dict[str, int]) -> None:
    """A dotted line at the task's chance level: random-weight cells should sit on it."""
    chance = next((T.num(r.get(f"{task}_chance_pct")) for r in rows if T.num(r.get(f"{task}_chance_pct")) is not None),
                  None)
    if chance is not None:
        fig.add_hline(y=chance, line=dict(color="#999", dash="dot", width=1), annotation_text="chance",
                      annotation_position="bottom right", annotation_font=dict(color="#777", size=11), **pos)


def pareto_chart(rows: List[Dict[str, Any]]) -> Optional[go.Figure]:
    tasks = [t for t in T.row_tasks(rows) if any(T.num(r.get(f"{t}_pct")) is not None and
                                                 T.num(r.get("weights_gb")) is not None for r in rows)]
    if not tasks:
        return None
    ms, col = models(rows), colours(rows)
    panels = [(t, m) for t in tasks for m in ms]  # one row per task, one column per model
    cols = len(ms)
    fig = make_subplots(rows=len(tasks), cols=cols, horizontal_spacing=0.08, vertical_spacing=min(0.14, 0.9 / max(1, len(tasks) - 1)),
                        subplot_titles=[f"{esc(task_table.label(t))} \u2014 {esc(m)}" for t, m in panels])
    shown = set()
    for i, (task, model) in enumerate(panels):
        pts = [r for r in rows if r["model"] == model and r["status"] == "ok"
               and T.num(r.get(f"{task}_pct")) is not None and T.num(r.get("weights_gb")) is not None]
        if not pts:
            fig.add_annotation(text="not measured", showarrow=False, font=dict(color="#777", size=15),
                               xref="x domain", yref="y domain", x=0.5, y=0.5, **_pos(i, cols))
            fig.update_xaxes(visible=False, **_pos(i, cols))
            fig.update_yaxes(visible=False, **_pos(i, cols))
            continue
        # Random-weight accuracy is noise: such cells are drawn (open markers) but never make the frontier.
        front = pareto_front([(r["weights_gb"], r[f"{task}_pct"], id(r)) for r in pts if not r["random_weights"]])
        front_ids = {p[2] for p in front}
        if len(front) > 1:
            fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines",
                                     line=dict(color="#444", dash="dash", width=1.5, shape="hv"),
                                     name="Pareto frontier", legendgroup="frontier",
                                     showlegend="frontier" not in shown, hoverinfo="skip"), **_pos(i, cols))
            shown.add("frontier")
        for r in pts:
            on_front = id(r) in front_ids
            fig.add_trace(go.Scatter(
                x=[r["weights_gb"]], y=[r[f"{task}_pct"]], mode="markers",
                name=esc(r["method"]), legendgroup=esc(r["method"]), showlegend=r["method"] not in shown,
                marker=dict(color=col[r["method"]], size=15 if on_front else 11,
                            symbol="circle-open" if r["random_weights"] else "circle",
                            line=dict(color="#000" if on_front else col[r["method"]], width=2.5 if on_front else 1)),
                hovertext=[hover_row(r) + ("<br><i>on the Pareto frontier</i>" if on_front else "")],
                hoverinfo="text"), **_pos(i, cols))
            shown.add(r["method"])
        _chance_line(fig, pts, task, _pos(i, cols))
        fig.update_xaxes(title_text="weight footprint (GB)", rangemode="tozero", **_pos(i, cols))
        fig.update_yaxes(title_text=score_axis(rows, task), **_pos(i, cols))
    return _layout(fig, len(tasks))


# ---------------------------------------------------------------- quality vs baseline


def _ci_bars(r: Dict[str, Any], key: str, value: float) -> Optional[Dict[str, Any]]:
    """Asymmetric error bars from the row's <key>_ci_low / <key>_ci_high, or None without a CI."""
    lo, hi = T.num(r.get(f"{key}_ci_low")), T.num(r.get(f"{key}_ci_high"))
    if lo is None or hi is None:
        return None
    return dict(type="data", symmetric=False, array=[hi - value], arrayminus=[value - lo], thickness=1.5, width=4)


def quality_chart(rows: List[Dict[str, Any]]) -> Optional[go.Figure]:
    """Per model: KL divergence from the baseline vs weight memory (log y, Pareto front: less of both is
    better), and top-1 agreement with the baseline vs weight memory; 95 % CI bars over windows."""
    ok = [r for r in rows if r["status"] == "ok" and T.num(r.get("kl_mean")) is not None
          and T.num(r.get("weights_gb")) is not None]
    if not ok:
        return None
    ms, col = [m for m in models(rows) if any(r["model"] == m for r in ok)], colours(rows)
    fig = make_subplots(rows=len(ms), cols=2, horizontal_spacing=0.1, vertical_spacing=0.16,
                        subplot_titles=[t for m in ms for t in (f"KL divergence — {esc(m)}",
                                                                 f"top-1 agreement — {esc(m)}")])
    shown = set()
    for i, model in enumerate(ms):
        pts = [r for r in ok if r["model"] == model]
        front = pareto_front([(r["weights_gb"], -r["kl_mean"], id(r)) for r in pts])
        if len(front) > 1:
            fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[-p[1] for p in front], mode="lines",
                                     line=dict(color="#444", dash="dash", width=1.5, shape="hv"),
                                     name="Pareto frontier", legendgroup="frontier",
                                     showlegend="frontier" not in shown, hoverinfo="skip"), row=i + 1, col=1)
            shown.add("frontier")
        for r in pts:
            for c, key, value in ((1, "kl", r["kl_mean"]), (2, "top1", T.num(r.get("top1_pct")))):
                if value is None:
                    continue
                fig.add_trace(go.Scatter(
                    x=[r["weights_gb"]], y=[value], mode="markers", error_y=_ci_bars(r, key, value),
                    name=esc(r["method"]), legendgroup=esc(r["method"]), showlegend=r["method"] not in shown,
                    marker=dict(color=col[r["method"]], size=12, symbol="circle-open" if r["random_weights"]
                                else "circle"),
                    hovertext=[hover_row(r)], hoverinfo="text"), row=i + 1, col=c)
                shown.add(r["method"])
        fig.update_xaxes(title_text="weight footprint (GB)", rangemode="tozero", row=i + 1)
        fig.update_yaxes(title_text="mean KL divergence (nats/token, log)", type="log", row=i + 1, col=1)
        fig.update_yaxes(title_text="same top token as the baseline (%)", row=i + 1, col=2)
    return _layout(fig, len(ms))


# ---------------------------------------------------------------- decode throughput vs batch size


def decode_series(r: T.ResultLike) -> Dict[str, List[Dict[str, Any]]]:
    """decode_path -> points {batch_size, p50, lo, hi} (lo/hi: p10/p90, else mean -/+ stdev)."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for d in T.decode_rows(r):
        s = T.dist_stats(d.tokens_per_s)
        bs, mid = T.num(d.batch_size), s.get("p50", s.get("mean"))
        if bs is None or mid is None:
            continue
        if "p10" in s and "p90" in s:
            lo, hi, band = s["p10"], s["p90"], "p10\u2013p90"
        elif (sd := s.get("stdev")) is not None:  # dist_stats keeps no null figure: "stdev" in s
            lo, hi, band = mid - sd, mid + sd, "\u00b1 stdev"
        else:
            lo = hi = mid
            band = "no spread recorded"
        out.setdefault(str(d.decode_path or "?"), []).append(
            {"batch_size": bs, "p50": mid, "lo": lo, "hi": hi, "band": band, "cv": s.get("cv")})
    for pts in out.values():
        pts.sort(key=lambda p: p["batch_size"])
    return out


def _by_cell(results: Sequence[T.ResultLike]) -> Dict[str, T.Result]:
    return {str(res.cell): res for res in (T.typed(r) for r in results)}


def throughput_chart(rows: List[Dict[str, Any]], results: Sequence[T.ResultLike]) -> Optional[go.Figure]:
    by_cell = _by_cell(results)
    series = {row["cell"]: decode_series(by_cell[row["cell"]]) for row in rows if row["cell"] in by_cell}
    if not any(series.values()):
        return None
    ms, col = models(rows), colours(rows)
    fig, cols = _grid(len(ms), [esc(m) for m in ms])
    shown = set()
    all_bs = sorted({p["batch_size"] for s in series.values() for pts in s.values() for p in pts})
    for i, model in enumerate(ms):
        for row in rows:
            if row["model"] != model:
                continue
            for path, pts in series.get(row["cell"], {}).items():
                label = f"{esc(row['method'])} ({esc(path)})"  # every line says its decode path
                fig.add_trace(go.Scatter(
                    x=[p["batch_size"] for p in pts], y=[p["p50"] for p in pts], mode="lines+markers",
                    name=label, legendgroup=label, showlegend=label not in shown,
                    line=dict(color=col[row["method"]], dash="dot" if decode_paths.compiled(path) else "solid", width=2),
                    marker=dict(size=8),
                    error_y=dict(type="data", symmetric=False, array=[p["hi"] - p["p50"] for p in pts],
                                 arrayminus=[p["p50"] - p["lo"] for p in pts], thickness=1.2, width=4),
                    hovertext=[f"<b>{label}</b><br>batch {p['batch_size']:.0f}: {p['p50']:,.1f} tok/s (p50)"
                               f"<br>{p['band']}: {p['lo']:,.1f} \u2013 {p['hi']:,.1f}"
                               f"<br>CV {fmt(100 * p['cv'] if p['cv'] is not None else None, 1)} %"
                               for p in pts],
                    hoverinfo="text"), **_pos(i, cols))
                shown.add(label)
        fig.update_xaxes(title_text="batch size", type="log", tickvals=all_bs, ticktext=[f"{b:.0f}" for b in all_bs],
                         **_pos(i, cols))
        fig.update_yaxes(title_text="decode throughput (tokens/s)", rangemode="tozero", **_pos(i, cols))
    return _layout(fig, math.ceil(len(ms) / cols))


# ---------------------------------------------------------------- memory breakdown


def memory_parts(r: T.ResultLike, row: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """weights, KV cache (analytic, largest measured shape), overhead = peak - weights - KV, in GB."""
    w, peak = T.weight_bytes(r), T.peak_bytes(r)[0]
    if w is None or peak is None:
        return None
    kv = T.kv_bytes_at_peak(r) or 0.0
    overhead = peak - w - kv
    return {"weights": w / T.GB, "KV cache": kv / T.GB, "overhead": max(overhead, 0.0) / T.GB,
            "overhead_raw": overhead / T.GB, "peak": peak / T.GB}


def memory_chart(rows: List[Dict[str, Any]], results: Sequence[T.ResultLike]) -> Optional[go.Figure]:
    by_cell = _by_cell(results)
    every = {row["cell"]: memory_parts(by_cell[row["cell"]], row) for row in rows if row["cell"] in by_cell}
    parts = {cell: p for cell, p in every.items() if p}  # the cells with a breakdown
    if not parts:
        return None
    ms = models(rows)
    fig, cols = _grid(len(ms), [esc(m) for m in ms])
    for i, model in enumerate(ms):
        cells = [row for row in rows if row["model"] == model and parts.get(row["cell"])]
        x = [esc(row["method"]) for row in cells]
        for part, colour in MEMORY_COLOURS.items():
            fig.add_trace(go.Bar(
                x=x, y=[parts[row["cell"]][part] for row in cells], name=part, legendgroup=part,
                showlegend=i == 0, marker_color=colour,
                hovertext=[f"<b>{esc(row['method'])}</b><br>{part}: {parts[row['cell']][part]:,.2f} GB<br>"
                           f"peak {'RSS' if row.get('peak_source') == 'rss' else 'allocated'}: "
                           f"{parts[row['cell']]['peak']:,.2f} GB"
                           + (f"<br>peak &lt; weights + KV by {-parts[row['cell']]['overhead_raw']:,.2f} GB: "
                              "overhead shown as 0" if parts[row["cell"]]["overhead_raw"] < 0 else "")
                           for row in cells],
                hoverinfo="text"), **_pos(i, cols))
        fig.update_yaxes(title_text="memory (GB)", **_pos(i, cols))
    fig = _layout(fig, math.ceil(len(ms) / cols))
    fig.update_layout(barmode="stack")
    return fig


# ---------------------------------------------------------------- accuracy delta with CI


def delta_chart(rows: List[Dict[str, Any]]) -> Optional[go.Figure]:
    tasks = [t for t in T.row_tasks(rows) if any(T.num(r.get(f"{t}_delta_pp")) is not None for r in rows)]
    if not tasks:
        return None
    ms = [m for m in models(rows) if any(T.num(r.get(f"{t}_delta_pp")) is not None
                                         for r in rows if r["model"] == m for t in tasks)]
    fig, cols = _grid(len(ms), [esc(m) for m in ms])
    order = T.row_tasks(rows)  # colour and marker by place in the summary, not by which tasks have a delta
    for i, model in enumerate(ms):
        for task in tasks:
            pts = [r for r in rows if r["model"] == model and T.num(r.get(f"{task}_delta_pp")) is not None]
            if not pts:
                continue
            d = [r[f"{task}_delta_pp"] for r in pts]
            # no interval (no per-item records): a zero-length bar, the hover says why
            hi = [_or(r.get(f"{task}_ci_high_pp"), r[f"{task}_delta_pp"]) - r[f"{task}_delta_pp"] for r in pts]
            lo = [r[f"{task}_delta_pp"] - _or(r.get(f"{task}_ci_low_pp"), r[f"{task}_delta_pp"]) for r in pts]
            fig.add_trace(go.Scatter(
                x=[label(r, task) for r in pts], y=d,
                mode="markers", name=esc(task_table.label(task)), legendgroup=task, showlegend=i == 0,
                marker=dict(color=OKABE_ITO[order.index(task) % len(OKABE_ITO)], size=11,
                            symbol=TASK_SYMBOLS[order.index(task) % len(TASK_SYMBOLS)]),
                error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, thickness=1.5, width=6),
                hovertext=[hover_row(r) + ("" if T.num(r.get(f"{task}_ci_low_pp")) is not None else
                                           "<br>no paired interval (per-item records or paired module absent)")
                           for r in pts],
                hoverinfo="text"), **_pos(i, cols))
        fig.add_hline(y=0, line=dict(color="#444", width=1), **_pos(i, cols))
        fig.update_yaxes(title_text="\u0394 vs baseline (pp)", **_pos(i, cols))
    fig = _layout(fig, math.ceil(len(ms) / cols))
    fig.update_layout(scattermode="group")
    return fig


# ---------------------------------------------------------------- MMLU categories heatmap


def _categories(r: T.ResultLike, task: str) -> Optional[Dict[str, Any]]:
    entry = T.task_entry(r, task)
    return entry.categories if entry and isinstance(entry.categories, dict) else None


def category_task(results: Sequence[T.ResultLike]) -> Optional[str]:
    """The task whose categories the heatmap shows: the first of the sweep whose results break it down (MMLU)."""
    return next((t for t in T.sweep_tasks(results) if any(_categories(r, t) is not None for r in results)), None)


def category_deltas(rows: List[Dict[str, Any]],
                    results: Sequence[T.ResultLike]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """model -> method -> category -> delta (pp) of the task's category accuracy vs the baseline cell."""
    task = category_task(results)
    if task is None:
        return {}
    typed_results = [T.typed(r) for r in results]
    base = T.baseline_method(typed_results)
    bases = T.baseline_cells(typed_results, base)
    by_cell = _by_cell(typed_results)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for row in rows:
        r, b = by_cell.get(row["cell"]), bases.get(row["model"])
        if r is None or b is None or r is b or r.status != "ok":
            continue
        cats, bcats = _categories(r, task), _categories(b, task)
        if cats is None or bcats is None:
            continue
        scores = {c: (T.category_score(cats[c]), T.category_score(bcats[c])) for c in cats if c in bcats}
        d = {c: 100 * (a - b) for c, (a, b) in scores.items() if a is not None and b is not None}
        if d:
            out.setdefault(row["model"], {})[row["cell"]] = d
    return out


def category_heatmap(rows: List[Dict[str, Any]], results: Sequence[T.ResultLike]) -> Optional[go.Figure]:
    deltas = category_deltas(rows, results)
    if not deltas:
        return None
    row_of = {r["cell"]: r for r in rows}
    ms = [m for m in models(rows) if m in deltas]
    cats = list(T.MMLU_CATEGORIES) + sorted({c for d in deltas.values() for cd in d.values() for c in cd}
                                            - set(T.MMLU_CATEGORIES))
    cats = [c for c in cats if any(c in cd for d in deltas.values() for cd in d.values())]
    zmax = max(abs(v) for d in deltas.values() for cd in d.values() for v in cd.values()) or 1.0
    # One model per row: method labels can be long, and rows stay comparable category by category.
    heights = [len(deltas[m]) for m in ms]
    height = 140 + 55 * sum(heights) + 90 * len(ms)
    fig = make_subplots(rows=len(ms), cols=1, subplot_titles=[esc(m) for m in ms], row_heights=heights,
                        vertical_spacing=min(0.3, 90 / height) if len(ms) > 1 else 0.1)
    cols = 1
    for i, model in enumerate(ms):
        cells = list(deltas[model])
        ylab = [label(row_of[c], category_task(results)) for c in cells]
        z = [[deltas[model][c].get(cat) for cat in cats] for c in cells]
        fig.add_trace(go.Heatmap(
            z=z, x=[cat.replace("_", " ") for cat in cats], y=ylab, colorscale=DIVERGING, zmid=0,
            zmin=-zmax, zmax=zmax, showscale=i == 0, colorbar=dict(title=dict(text="\u0394 pp")),
            texttemplate="%{z:+.1f}", hovertemplate="%{y}<br>%{x}: %{z:+.1f} pp<extra></extra>", xgap=2, ygap=2),
            **_pos(i, cols))
        fig.update_yaxes(autorange="reversed", **_pos(i, cols))
    fig = _layout(fig, 1)
    fig.update_layout(height=height, margin=dict(l=20, r=20, t=50, b=40))
    return fig


# ---------------------------------------------------------------- all of them


def build_charts(rows: List[Dict[str, Any]], results: Sequence[T.ResultLike]) -> List[Dict[str, Any]]:
    """The page's charts in order: key, title, caption, and the figure (None = not measured in this sweep)."""
    results = [T.typed(r) for r in results]  # each result.json read once through its typed result
    cat = category_task(results)
    return [
        {"key": "quality", "title": "Quality vs weight memory: KL divergence and top-1 agreement with the baseline",
         "caption": "Left: mean KL(baseline ‖ method) per scored token, log scale; down and to the left is better, "
                    "dashed: the frontier. Right: how often the method's most likely next token is the baseline's. "
                    "Bars: 95 % CI over corpus windows. The baseline itself (KL 0, 100 %) is not drawn.",
         "figure": quality_chart(rows)},
        {"key": "pareto", "title": "Accuracy vs weight memory (Pareto front)",
         "caption": "Up and to the left is better. Dashed: the frontier (cells no other cell beats on both); "
                    "large outlined markers lie on it. Open markers: random weights (never on the frontier). "
                    "Dotted: the task's chance level. One row per task, headed by its headline metric (the task "
                    "table's, qbench/evaluate/tasks.py). Hover a point for its whole row.",
         "figure": pareto_chart(rows)},
        {"key": "throughput", "title": "Decode throughput vs batch size",
         "caption": "Median tokens/s per method; bars span p10\u2013p90 of the timed runs (\u00b1 stdev where raw "
                    "values are absent). Solid lines: the eager decode path; dotted: the static (compiled) path, the one "
                    "to compare where measured (docs/stability.md).",
         "figure": throughput_chart(rows, results)},
        {"key": "memory", "title": "Memory breakdown at peak",
         "caption": "Weights (measured), KV cache (analytic, largest measured shape) and overhead = peak \u2212 "
                    "weights \u2212 KV (activations, allocator slack, CUDA context). CPU cells use peak RSS.",
         "figure": memory_chart(rows, results)},
        {"key": "delta", "title": "Accuracy change vs baseline",
         "caption": "\u0394 in percentage points; bars are the paired 95 % CI over the items both cells evaluated. "
                    f"{DAGGER}: random weights, the change means nothing.",
         "figure": delta_chart(rows)},
        {"key": "categories", "title": f"{task_table.label(cat) if cat else 'Accuracy'} change per category",
         "caption": f"\u0394 of each {task_table.label(cat) if cat else 'task'} category vs the baseline "
                    "(pp); blue better, vermillion worse. "
                    "A plain difference of category scores (no pairing, no interval): small categories swing widely. "
                    f"{DAGGER}: random weights; {DOUBLE_DAGGER}: limited evaluation, a subset of items.",
         "figure": category_heatmap(rows, results)},
    ]
