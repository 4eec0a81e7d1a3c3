"""A task beyond MMLU and GSM8K reaches every part of the report through the task table alone: summary.csv, the
summary table, the tidy table, the Pareto and the delta charts, headed by the table's metric (ARC-Challenge:
acc_norm, not the acc lm-eval lists first). A task the table does not know shows under its own name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from qbench.report import charts as C
from qbench.report import html as H
from qbench.report import tables as T
from tests.test_report import FAKE_PLOTLYJS, MIXED, row_html

N = 40
# acc_norm records per cell (1 = correct); acc's are different, so a headline mix-up changes every number
ARC_NORM = {"bf16": "1" * 24 + "0" * 16, "bnb_nf4": "1" * 20 + "0" * 20, "gptq_4bit": "0" * 2 + "1" * 24 + "0" * 14}
ARC_ACC = {"bf16": "1" * 10 + "0" * 30, "bnb_nf4": "1" * 30 + "0" * 10, "gptq_4bit": "1" * 12 + "0" * 28}
WINO = {"bf16": "1" * 30 + "0" * 10, "bnb_nf4": "1" * 28 + "0" * 12}


def _arc(method: str, recorded: str) -> tuple:
    """An arc_challenge block as accuracy.run writes it; ``recorded``: the headline the run chose."""
    norm, acc = ARC_NORM[method], ARC_ACC[method]
    metrics = {"acc,none": acc.count("1") / N, "acc_norm,none": norm.count("1") / N}
    entry = {"metric": recorded, "value": metrics[recorded], "stderr": 0.07, "metrics": metrics,
             "stderrs": {"acc,none": 0.071, "acc_norm,none": 0.077}, "n_items": N, "n_items_available": 1172,
             "num_fewshot": 25, "limit": N, "eval_time_s": 60.0, "items_per_s": N / 60, "lm_eval_task": "arc_challenge",
             "chance_level": 0.25 if recorded == "acc_norm,none" else None}
    items = {"doc_ids": list(range(N)), "correct": norm if recorded == "acc_norm,none" else acc,
             "correct_by_metric": {"acc,none": acc, "acc_norm,none": norm}}
    return entry, items


def _wino(method: str) -> tuple:
    c = WINO[method]
    entry = {"metric": "acc,none", "value": c.count("1") / N, "stderr": 0.07, "metrics": {"acc,none": c.count("1") / N},
             "stderrs": {"acc,none": 0.07}, "n_items": N, "num_fewshot": 0, "limit": N, "chance_level": None}
    return entry, {"doc_ids": list(range(N)), "correct": c}


def _sweep(tmp_path: Path, recorded: str = "acc_norm,none") -> Path:
    """The mixed fixture sweep with arc_challenge in three llama3_8b cells and an unknown task in two."""
    sweep = tmp_path / "runs" / "mixed"
    shutil.copytree(MIXED, sweep)
    for method in ARC_NORM:
        path = sweep / f"llama3_8b__{method}" / "result.json"
        r = json.loads(path.read_text())
        acc = r["metrics"]["accuracy"]
        acc["tasks"]["arc_challenge"], acc["items"]["arc_challenge"] = _arc(method, recorded)
        if method in WINO:
            acc["tasks"]["winogrande"], acc["items"]["winogrande"] = _wino(method)
        path.write_text(json.dumps(r))
    return sweep


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "get_plotlyjs", lambda: FAKE_PLOTLYJS)
    return _sweep(tmp_path)


def _row(rows, method):
    [row] = [r for r in rows if r["model"] == "llama3_8b" and r["method"] == method]
    return row


def test_summary_rows_carry_the_new_task_headed_by_acc_norm(sweep):
    results = T.load_results(sweep)
    rows = T.summary_rows(results)
    assert T.row_tasks(rows) == ["mmlu", "gsm8k", "arc_challenge", "winogrande"]  # the table's order, then A-Z
    base, nf4 = _row(rows, "bf16"), _row(rows, "bnb_nf4")
    assert base["arc_challenge_metric"] == "acc_norm,none" and base["arc_challenge_pct"] == pytest.approx(60.0)
    assert base["arc_challenge_chance_pct"] == pytest.approx(25.0)
    # paired on the acc_norm records: 4 items right -> wrong, none the other way
    assert nf4["arc_challenge_delta_source"] == "paired" and nf4["arc_challenge_delta_pp"] == pytest.approx(-10.0)
    assert nf4["arc_challenge_flip_pct"] == pytest.approx(10.0) and nf4["arc_challenge_fewshot"] == 25
    # the unknown task: its recorded headline, no chance level
    assert nf4["winogrande_metric"] == "acc,none" and nf4["winogrande_delta_pp"] == pytest.approx(-5.0)
    assert nf4["winogrande_chance_pct"] is None
    assert _row(rows, "bnb_int8")["arc_challenge_pct"] is None  # the error cell has the columns, empty


def test_a_result_headed_by_acc_is_read_by_the_table_headline(tmp_path, monkeypatch):
    """Results written before the table named acc_norm (headline acc,none) still show acc_norm, paired on its
    own records (correct_by_metric)."""
    rows = T.summary_rows(T.load_results(_sweep(tmp_path, recorded="acc,none")))
    nf4 = _row(rows, "bnb_nf4")
    assert nf4["arc_challenge_metric"] == "acc_norm,none" and nf4["arc_challenge_pct"] == pytest.approx(50.0)
    assert nf4["arc_challenge_delta_pp"] == pytest.approx(-10.0) and nf4["arc_challenge_chance_pct"] == 25.0


def test_summary_csv_and_tidy_table(sweep, tmp_path):
    results = T.load_results(sweep)
    paths = T.write_tables(results, tmp_path / "out")
    summary = pd.read_csv(paths["summary_csv"])
    for col in ("arc_challenge_pct", "arc_challenge_metric", "arc_challenge_delta_pp", "winogrande_pct"):
        assert col in summary.columns
    tidy = T.tidy_table(results)
    arc = tidy[(tidy["task"] == "arc_challenge") & (tidy["cell"] == "llama3_8b__bf16")]
    assert arc["metric"].tolist()[:2] == ["arc_challenge.acc_norm,none", "arc_challenge.acc,none"]  # headline first
    assert arc["metric"].is_unique
    assert arc[arc["metric"] == "arc_challenge.acc_norm,none"]["value"].item() == pytest.approx(0.6)
    assert arc[arc["metric"] == "arc_challenge.stderr"]["value"].item() == pytest.approx(0.07)


def test_pareto_and_delta_charts_show_the_new_task(sweep):
    results = T.load_results(sweep)
    rows = T.summary_rows(results)
    charts = {c["key"]: c["figure"] for c in C.build_charts(rows, results)}
    pareto = charts["pareto"]
    titles = [a.text for a in pareto.layout.annotations]
    assert "ARC-Challenge \u2014 llama3_8b" in titles and "winogrande \u2014 llama3_8b" in titles
    axes = [pareto.layout[k].title.text for k in pareto.layout if k.startswith("yaxis")]
    assert "ARC-Challenge accuracy (%, acc_norm)" in axes and "MMLU accuracy (%)" in axes
    arc_points = [t for t in pareto.data if t.mode == "markers" and t.y and t.y[0] == pytest.approx(60.0)]
    assert arc_points, "the baseline's ARC-Challenge point (60 %) is not drawn"
    delta = charts["delta"]
    names = [t.name for t in delta.data]
    assert "ARC-Challenge" in names and "winogrande" in names
    arc = next(t for t in delta.data if t.name == "ARC-Challenge")
    assert sorted(arc.y) == pytest.approx([-10.0, 0.0])  # nf4: -10 pp; gptq: 2 -> wrong, 2 -> right
    assert len({t.marker.symbol for t in delta.data}) == len(set(names))  # one marker per task


def test_summary_table_has_the_task_columns(sweep):
    results = T.load_results(sweep)
    page = H.render_sweep(results, "mixed", plotlyjs=FAKE_PLOTLYJS)
    assert ">ARC-Challenge<" in page and "% correct, acc_norm" in page and ">ARC-Challenge \u0394<" in page
    assert ">winogrande<" in page
    nf4 = row_html(page, "llama3_8b__bnb_nf4")
    assert "50.0" in nf4 and "\u221210.0 [" in nf4
