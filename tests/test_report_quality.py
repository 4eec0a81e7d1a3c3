"""The report opens with quality against the baseline: a cell measured before its baseline gets its comparison
when the report is built (from the two logprob files), and KL divergence, top-1 agreement, perplexity (ratio)
reach the HTML page, its first chart and summary.csv."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qbench import tiny
from qbench.evaluate import quality
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
    """fp32 baseline + a perturbed cell that ran first (no comparison in its result), as on a parallel launcher."""
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
    # the quantized cell first: the baseline's file does not exist yet
    q_cand = quality.run(cand, tok, QCFG, text=text, cell_dir=root / "small__nf4",
                         baseline_file=root / "small__fp32" / quality.LOGPROBS_FILE, meta=meta)
    q_base = quality.run(base, tok, QCFG, text=text, cell_dir=root / "small__fp32", baseline_file=None, meta=meta)
    assert q_cand["comparison"] is None
    for method, q in (("nf4", q_cand), ("fp32", q_base)):
        (root / f"small__{method}" / "result.json").write_text(json.dumps(_result(method, q, "q")))
    return root


def test_a_cell_measured_before_its_baseline_is_compared_when_the_report_is_built(sweep):
    results = {r["cell"]: r for r in T.load_results(sweep)}
    q = results["small__nf4"]["metrics"]["quality"]
    assert q["comparison_source"] == "report"
    assert q["comparison"]["kl_divergence"]["mean"] > 0
    assert 0 < q["comparison"]["top1_agreement_pct"]["mean"] < 100


def test_quality_leads_the_page_and_reaches_summary_csv(sweep, tmp_path):
    results = T.load_results(sweep)
    page = H.render_sweep(results, "q", plotlyjs=FAKE_PLOTLYJS)
    assert page.index('id="quality"') < page.index('id="summary"')
    section = page[page.index('id="quality"'):page.index('id="summary"')]
    row = section[section.index('data-cell="small__nf4"'):]
    row = row[:row.index("</tr>")]
    kl = {r["cell"]: r for r in results}["small__nf4"]["metrics"]["quality"]["comparison"]["kl_divergence"]
    assert f"{kl['mean']:.3g}" in row and "from files (report)" in row
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
