"""Where a sweep's time went: each cell's ``timings.budget`` (qbench/measure/budget.py) as a pandas frame, a
stacked bar per cell and the sweep's total (plotly), for the report's "Where the time went" chart.

The budget's parts are grouped into a few kinds of cost, so that a bar reads at a glance: starting the process
and importing, loading, quantizing, building kernels and compiling, measuring (latency's warm-ups and timed
runs, the evaluation's model calls, quality), and preparing the evaluation (lm-eval's tasks and prompts). Every
part keeps its own row in :func:`budget_frame`. Results without a budget (written before it existed) are left
out, and a sweep with none gets no chart.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qbench.report.charts import FONT, esc
from qbench.report.loading import ResultLike, present, typed

# group → (colour, the budget's parts in it); Okabe & Ito's colours plus greys for what measures nothing
GROUPS: Dict[str, tuple] = {
    "start-up and imports": ("#999999", ("process_start_s", "startup_s", "setup_s", "imports_s", "cuda_context_s")),
    "load": ("#56B4E9", ("resolve_s", "load_s")),
    "quantize": ("#0072B2", ("quantize_s", "quantize_other_s")),
    "kernel builds and compile": ("#D55E00", ("kernel_compile_s", "latency_compile_s")),
    "latency warm-ups": ("#F0E442", ("latency_warmup_s",)),
    "latency timed runs": ("#E69F00", ("latency_timed_s",)),
    "eval: tasks and prompts": ("#CC79A7", ("eval_tasks_s", "eval_requests_s")),
    "eval: model calls": ("#009E73", ("eval_model_calls_s", "eval_perplexity_s")),
    "quality": ("#000000", ("quality_s", "quality_model_calls_s", "quality_compare_s")),
    "quality: text and files": ("#666666", ("quality_text_s", "quality_baseline_read_s", "quality_record_s",
                                            "quality_write_s", "quality_other_s")),
    "other": ("#DDDDDD", ()),  # memory_s, latency_other_s, eval_other_s, finish_s, unaccounted_s, and new parts
}
GROUP_OF = {part: group for group, (_, parts) in GROUPS.items() for part in parts}
COLUMNS = ["cell", "model", "method", "status", "part", "group", "seconds"]


def budget_frame(results: Sequence[ResultLike]) -> pd.DataFrame:
    """One row per (cell, budget part): seconds, and the group it is drawn in. Cells without a budget: none."""
    rows = []
    for res in (typed(r) for r in results):
        budget = res.timings.budget if res.timings else None
        if not budget:
            continue
        for part, seconds in budget.to_dict().items():  # the parts in the order the cell wrote them
            if isinstance(seconds, (int, float)):
                rows.append({"cell": present(res.cell), "model": present(res.model), "method": present(res.method),
                             "status": present(res.status), "part": part, "group": GROUP_OF.get(part, "other"),
                             "seconds": float(seconds)})
    return pd.DataFrame(rows, columns=COLUMNS)


def by_group(frame: pd.DataFrame) -> pd.DataFrame:
    """cell × group seconds, groups in GROUPS' order (absent ones dropped), cells in the sweep's order."""
    table = frame.pivot_table(index="cell", columns="group", values="seconds", aggfunc="sum", sort=False)
    return table[[g for g in GROUPS if g in table.columns]].fillna(0.0)


def sweep_totals(frame: pd.DataFrame) -> pd.DataFrame:
    """The sweep's seconds per group, summed over its cells, with each group's share of the total (%)."""
    totals = frame.groupby("group", sort=False)["seconds"].sum()
    totals = totals.reindex([g for g in GROUPS if g in totals.index])
    return pd.DataFrame({"seconds": totals, "share_pct": 100 * totals / totals.sum() if totals.sum() else 0.0})


def budget_chart(frame: pd.DataFrame) -> go.Figure:
    """A stacked horizontal bar per cell (seconds) above one bar for the whole sweep (minutes)."""
    table = by_group(frame)
    totals = sweep_totals(frame)
    height = 200 + 32 * len(table) + 60  # px: the legend, a bar per cell, the sweep's bar
    fig = make_subplots(rows=2, cols=1, row_heights=[max(len(table), 1), 1.2], vertical_spacing=80 / height,
                        subplot_titles=("per cell (s)", "the sweep (min)"))
    cells = [esc(c) for c in table.index]
    for group in table.columns:
        colour = GROUPS[group][0]
        fig.add_trace(go.Bar(y=cells, x=table[group], name=group, orientation="h", marker_color=colour,
                             legendgroup=group, hovertemplate=f"%{{y}}<br>{esc(group)}: %{{x:.1f}} s<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Bar(y=["sweep"], x=[totals.loc[group, "seconds"] / 60], name=group, orientation="h",
                             marker_color=colour, legendgroup=group, showlegend=False,
                             customdata=[[totals.loc[group, "share_pct"]]],
                             hovertemplate=f"{esc(group)}: %{{x:.2f}} min (%{{customdata[0]:.0f}} %)<extra></extra>"),
                      row=2, col=1)
    fig.update_layout(barmode="stack", font=FONT, template="plotly_white", legend=dict(orientation="h", y=-0.15),
                      height=height, margin=dict(l=20, r=20, t=40, b=40))
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    return fig


def caption(frame: pd.DataFrame) -> str:
    """The sweep's total in words: wall time, and what share went to measuring."""
    totals = sweep_totals(frame)
    total = totals["seconds"].sum()
    measuring = totals.loc[[g for g in ("latency warm-ups", "latency timed runs", "eval: model calls", "quality")
                            if g in totals.index], "seconds"].sum()
    n = frame["cell"].nunique()
    return (f"Every second of each cell, from its process's start to its end (timings.budget; the parts add up to "
            f"the cell's wall time; 'other' holds memory figures, each phase's own work and unaccounted_s). "
            f"This sweep: {n} cell{'s' if n != 1 else ''}, {total / 60:.1f} min, of which {measuring / 60:.1f} min "
            f"({100 * measuring / total if total else 0:.0f} %) measured something; the rest is what starting, "
            "loading, quantizing, compiling and preparing cost. docs/time_budget.md")


def charts(results: Sequence[ResultLike]) -> List[Dict[str, Any]]:
    """The report's chart entry (html.py), or none when no result has a budget."""
    frame = budget_frame(results)
    if frame.empty:
        return []
    return [{"key": "time_budget", "title": "Where the time went", "caption": caption(frame),
             "figure": budget_chart(frame)}]
