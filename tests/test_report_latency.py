"""The report's latency figures: each with its CI, flagged when capped, % of the card's measured bandwidth, and
the decode-gap table (bound -> graph -> static -> eager)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from qbench.measure import stats
from qbench.report import html as H
from qbench.report import tables as T

MIXED = Path(__file__).parent / "fixtures" / "runs" / "mixed"
FAKE_PLOTLYJS = "window.Plotly = {newPlot: function () {}};"


def _decode(path, values, bound=200.0, measured_bound=180.0, stopped_by="precision"):
    tps = stats.summarize(values, "tokens/s")
    return {"decode_path": path, "batch_size": 1, "prompt_tokens": 128, "new_tokens": 64, "tokens_per_s": tps,
            "per_token_ms": stats.summarize([1e3 / v for v in values], "ms"),
            "bandwidth_bound_tokens_per_s": bound, "bandwidth_bound_fraction": tps["p50"] / bound,
            "measured_bandwidth_bound_tokens_per_s": measured_bound,
            "measured_bandwidth_bound_fraction": tps["p50"] / measured_bound,
            "precision": {"target_ci_pct": 1.0, "ci_half_width_pct": tps["median_ci"]["half_width_pct"],
                          "stopped_by": stopped_by, "repeats": len(values)}}


@pytest.fixture
def graph_results():
    results = T.load_results(MIXED)
    cell = copy.deepcopy(next(r for r in results if r["status"] == "ok" and r["method"] == "bf16"))
    cell["method"], cell["cell"] = "bf16_graph", f"{cell['model']}__bf16_graph"
    cell["metrics"]["latency"]["decode"] = [
        _decode("eager", [40.0, 41.0, 42.0, 43.0, 44.0, 45.0]),
        _decode("static", [128.0, 129.0, 129.0, 129.0, 129.0, 130.0]),  # ±1 tok/s: [min, max] at n = 6
        _decode("graph", [150.0, 155.0, 157.0, 157.0, 160.0, 170.0], stopped_by="time_cap"),
    ]
    cell["metrics"]["latency"]["copy_bandwidth"] = {"bytes_per_s": 4.27e12}
    return [r for r in results if r["cell"] != cell["cell"]] + [cell]


def test_summary_shows_each_figure_with_its_ci(graph_results):
    row = next(r for r in T.summary_rows(graph_results) if r["method"] == "bf16_graph")
    assert row["decode_path"] == "static" and row["decode_tps"] == 129.0
    assert row["decode_ci_pct"] == pytest.approx(100 * 1.0 / 129.0)
    assert row["bw_measured_pct"] == pytest.approx(100 * 129 / 180) and row["bw_bound_pct"] == pytest.approx(100 * 129 / 200)
    assert row["decode_graph_capped"] and not row["decode_capped"]
    assert row["copy_bandwidth_tb_s"] == pytest.approx(4.27)
    view = H.summary_view(T.summary_rows(graph_results))
    mine = next(v for v in view["rows"] if v["row"]["method"] == "bf16_graph")
    texts = [c["text"] for c in mine["cells"]]
    assert "129.0 \u00b1 1.0 static" in texts  # '129 ± 1.0 tok/s', as the issue asks


def test_decode_gap_table_splits_the_gap_between_kernels_and_generate(graph_results):
    gap = [g for g in T.decode_gap_rows(graph_results) if g["cell"].endswith("bf16_graph")]
    assert len(gap) == 1
    g = gap[0]
    assert g["bound_tps"] == 180.0 and g["bound_source"] == "measured copy bandwidth"
    assert g["graph_pct_of_bound"] == pytest.approx(100 * 157 / 180)
    assert g["generate_keeps_pct"] == pytest.approx(100 * 129 / 157)
    page = H.render_sweep(graph_results, "mixed", plotlyjs=FAKE_PLOTLYJS)
    assert 'id="decode-gap"' in page and "157.0 \u00b1" in page and "(87 %)" in page


def test_capped_figure_is_marked(graph_results):
    for r in graph_results:
        if r["method"] == "bf16_graph":
            r["metrics"]["latency"]["decode"][1]["precision"]["stopped_by"] = "time_cap"
    view = H.summary_view(T.summary_rows(graph_results))
    mine = next(v for v in view["rows"] if v["row"]["method"] == "bf16_graph")
    titles = [m["title"] for c in mine["cells"] for m in c["marks"]]
    assert any(t.startswith("precision target not reached") for t in titles)


def test_tidy_table_carries_the_ci(graph_results):
    tidy = T.tidy_table(graph_results)
    mine = tidy[(tidy["cell"].str.endswith("bf16_graph")) & (tidy["metric"] == "decode.tokens_per_s")]
    half = mine[(mine["stat"] == "ci_half_width_pct") & (mine["decode_path"] == "static")]
    assert len(half) == 1 and half["unit"].iloc[0] == "%" and half["value"].iloc[0] == pytest.approx(100 / 129)
    capped = tidy[(tidy["cell"].str.endswith("bf16_graph")) & (tidy["metric"] == "decode.capped")]
    assert set(zip(capped["decode_path"], capped["value"])) == {("eager", 0.0), ("static", 0.0), ("graph", 1.0)}
