"""The report opens with quality against the baseline: KL divergence, top-1 agreement, perplexity (ratio) reach the
HTML page, its first chart and summary.csv. The report reads result.json only: a cell whose comparison is not
there (measured before its baseline, compared at the sweep's end) is shown as pending, never computed here."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qbench.evaluate import quality
from qbench.load import tiny
from qbench.report import html as H
from qbench.report import tables as T

FIXTURE = Path(__file__).parent / "fixtures" / "runs" / "demo" / "tiny__bf16" / "result.json"
QCFG = OmegaConf.create({"ctx_tokens": 64, "max_windows": 4, "batch_size": 4, "coverage": 0.999, "max_kept": 4096})
FAKE_PLOTLYJS = "window.Plotly = {newPlot: function () {}};"


def _result(method: str, q: dict, sweep: str) -> dict:
    r = json.loads(FIXTURE.read_text())
    r.update(cell=f"small__{method}", model="small", method=method, sweep=sweep, random_weights=False)
    r["config"]["run"]["baseline_method"] = "fp32"
    r["config"]["model"]["source"] = "/models/small"
    r["source"] = {"path": "/models/small", "random_weights": False}
    r["metrics"]["quality"] = {**q, "baseline_method": "fp32"}
    r["metrics"].pop("accuracy", None)
    return r


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """fp32 baseline, a perturbed cell compared live, and a copy of it stored before its baseline (no comparison)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(120.0)
    cand = copy.deepcopy(base)
    with torch.no_grad():
        for p in cand.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.05)
    tok, text = tiny.build_tokenizer(), tiny.TINY_TEXT.read_text()[:30000]
    root = tmp_path_factory.mktemp("runs") / "q"
    meta = {"source": "builtin:tiny_text", "model_config_hash": "small"}
    q_base = quality.run(base, tok, QCFG, text=text, cell_dir=root / "small__fp32", baseline_file=None, meta=meta)
    q_cand = quality.run(cand, tok, QCFG, text=text, cell_dir=root / "small__nf4",
                         baseline_file=root / "small__fp32" / quality.LOGPROBS_FILE, meta=meta)
    assert q_cand["comparison_source"] == "live"
    # a cell measured before its baseline: its result holds no comparison (the sweep's end adds it)
    q_late = {**q_cand, "comparison": None, "comparison_source": None}
    for method, q in (("nf4", q_cand), ("fp32", q_base), ("late", q_late)):
        (root / f"small__{method}").mkdir(parents=True, exist_ok=True)
        (root / f"small__{method}" / "result.json").write_text(json.dumps(_result(method, q, "q")))
    # its logprob file is there, as it is for such a cell: the report still does not compare it
    shutil.copy(root / "small__nf4" / quality.LOGPROBS_FILE, root / "small__late" / quality.LOGPROBS_FILE)
    return root


def test_a_cell_without_its_comparison_is_shown_pending_not_computed_by_the_report(sweep):
    results = {r["cell"]: r for r in T.load_results(sweep)}
    assert results["small__late"]["metrics"]["quality"]["comparison"] is None  # as stored: the report reads only
    rows = {r["cell"]: r for r in T.summary_rows(list(results.values()))}
    assert rows["small__late"]["kl_mean"] is None and rows["small__late"]["quality_source"] is None
    assert rows["small__late"]["ppl"] == pytest.approx(rows["small__nf4"]["ppl"])
    page = H.render_sweep(list(results.values()), "q", plotlyjs=FAKE_PLOTLYJS)
    section = page[page.index('id="quality"'):page.index('id="summary"')]
    row = section[section.index('data-cell="small__late"'):]
    assert "pending" in row[:row.index("</tr>")]


def test_quality_leads_the_page_and_reaches_summary_csv(sweep, tmp_path):
    results = T.load_results(sweep)
    page = H.render_sweep(results, "q", plotlyjs=FAKE_PLOTLYJS)
    assert page.index('id="quality"') < page.index('id="summary"')
    section = page[page.index('id="quality"'):page.index('id="summary"')]
    row = section[section.index('data-cell="small__nf4"'):]
    row = row[:row.index("</tr>")]
    kl = {r["cell"]: r for r in results}["small__nf4"]["metrics"]["quality"]["comparison"]["kl_divergence"]
    assert f"{kl['mean']:.3g}" in row and "live" in row
    assert 'id="fig-quality"' in section  # the KL / top-1 vs memory chart sits in the quality section
    paths = T.write_tables(results, tmp_path)
    summary = T.pd.read_csv(paths["summary_csv"]).set_index("method")
    assert summary.loc["nf4", "kl_mean"] == pytest.approx(kl["mean"])
    assert summary.loc["fp32", "ppl"] > 1 and summary.loc["nf4", "top1_pct"] < 100
    tidy = T.pd.read_csv(paths["tidy_csv"])
    assert set(tidy[tidy.group == "quality"].metric) >= {"kl_mean", "top1_pct", "ppl_ratio", "ppl"}


def test_no_quality_section_without_quality(tmp_path):
    shutil.copytree(FIXTURE.parent.parent, tmp_path / "demo")
    page = H.render_sweep(T.load_results(tmp_path / "demo"), "demo", plotlyjs=FAKE_PLOTLYJS)
    assert 'id="quality"' not in page


def _q(role: str, ppl, kl=None, **extra) -> dict:
    comparison = None if kl is False else {"kl_divergence": {"mean": kl, "p50": kl, "p99": kl, "max": kl},
                                           "top1_agreement_pct": {"mean": None}, "ppl_ratio": {"mean": None}}
    return {"role": role, "ppl": ppl, "kept_mass_min": 0.9991, "comparison": comparison,
            "comparison_source": None if comparison is None else "live",
            "settings": {"coverage": 0.999, "batch_size": 1, "ctx_tokens": 64, "source": "builtin:tiny_text"}, **extra}


@pytest.fixture
def broken_sweep(tmp_path):
    """A baseline, a cell whose figures the store wrote as null (with the reason the cell recorded), one written
    before reasons were recorded, and one whose max_kept cut before coverage."""
    root = tmp_path / "b"
    why = "NaN or infinite logits at 3 of 124 scored positions (first in window 1)"
    cells = {"fp32": _q("baseline", 20.0, kl=False),
             "nf4": _q("compared", None, kl=None, nonfinite={"ppl": why, "kl": f"{why} in this cell"}),
             "hqq": _q("compared", None, kl=None),
             "int8": {**_q("compared", 21.0, kl=0.02), "kept_mass_min": 0.953}}
    for method, q in cells.items():
        (root / f"small__{method}").mkdir(parents=True)
        (root / f"small__{method}" / "result.json").write_text(json.dumps(_result(method, q, "b")))
    return root, why


def test_a_cell_whose_figures_are_not_finite_stays_in_every_table_with_the_reason(broken_sweep, tmp_path):
    root, why = broken_sweep
    results = T.load_results(root)
    rows = {r["cell"]: r for r in T.summary_rows(results)}
    assert rows["small__nf4"]["quality_nonfinite"] == (f"quality: ppl not finite: {why}; "
                                                       f"quality: kl not finite: {why} in this cell")
    assert rows["small__hqq"]["quality_nonfinite"] == ("quality: ppl not finite (stored as null; the result records no "
                                                       "reason); quality: kl not finite (stored as null; the result "
                                                       "records no reason)")
    assert f"quality: ppl not finite: {why}" in rows["small__nf4"]["warnings"]
    page = H.render_sweep(results, "b", plotlyjs=FAKE_PLOTLYJS)
    section = page[page.index('id="quality"'):page.index('id="summary"')]
    for cell in ("small__nf4", "small__hqq"):
        row = section[section.index(f'data-cell="{cell}"'):]
        assert "not finite" in row[:row.index("</tr>")]
    assert why in section
    paths = T.write_tables(results, tmp_path / "out")
    summary = T.pd.read_csv(paths["summary_csv"]).set_index("method")
    assert summary.loc["nf4", "quality_nonfinite"].startswith("quality: ppl not finite: NaN")
    assert "small__nf4" in set(T.pd.read_csv(paths["tidy_csv"]).cell)


def test_kept_mass_below_coverage_is_shown_and_warned(broken_sweep, tmp_path):
    root, _ = broken_sweep
    results = T.load_results(root)
    rows = {r["cell"]: r for r in T.summary_rows(results)}
    assert rows["small__int8"]["kept_mass_min"] == 0.953 and rows["small__int8"]["kept_mass_low"]
    assert not rows["small__fp32"]["kept_mass_low"]
    assert any("keep mass down to 0.9530 < coverage 0.999" in w for w in rows["small__int8"]["warnings"])
    tidy = T.pd.read_csv(T.write_tables(results, tmp_path / "out")["tidy_csv"])
    kept = tidy[(tidy.metric == "kept_mass_min") & (tidy.cell == "small__int8")]
    assert kept.value.tolist() == [0.953] and kept.unit.tolist() == ["fraction of probability"]
    view = {q["row"]["cell"]: q for q in H.quality_view(T.summary_rows(results), results)["rows"]}
    assert view["small__int8"]["kept_mass"] == "0.9530 < coverage"
