"""The decision panel and claims table (qbench/report/decision.py) and the one-site build (qbench/report/site.py),
on the committed example results (reports/examples/runs: real SmolLM2-135M cells measured on an H200 and a CPU,
random-weight Llama-3.2-1B cells on an H100), without a browser; tests/test_report_browser.py runs the page's script.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qbench.report import cli, site
from qbench.report import decision as D
from qbench.report import html as H
from qbench.report import tables as T

EXAMPLES = Path(__file__).resolve().parent.parent / "reports" / "examples" / "runs"
FIXTURES = Path(__file__).parent / "fixtures" / "runs"
FAKE_PLOTLYJS = "/* plotly.js stand-in for fast tests */ window.Plotly = {newPlot: function () {}};"
LOOSE = {"kl_max": 0.3, "ppl_ratio_max": 1.3, "acc_drop_pp": 10.0, "strict": False}


def panel(sweep: str, model: int = 0):
    results = T.load_results(EXAMPLES / sweep)
    return D.decision_data(T.summary_rows(results), results)["models"][model]


def claim(m, method):
    [k] = [k for k in m["claims"] if k["method"] == method]
    return k


def test_the_budget_decides_least_memory():
    # fp32 baseline; KL (nats/token): torchao_int8wo 0.0038, bnb_int8 0.0147, awq 0.120, gptq 0.180, hqq 0.185,
    # bnb_nf4 0.231, torchao_int4wo 0.237
    m = panel("gpu_smollm2")
    assert m["measured"] == {"kl": True, "ppl_ratio": True, "acc": ["mmlu", "gsm8k"]}
    default = D.decide(m, D.DEFAULT_BUDGET)
    # 0.16348 against 0.16364 GB: within 1 %, a tie said as one
    assert default["memory"] == ["bnb_int8", "torchao_int8wo"]
    assert default["excluded"] == {"awq": "KL 0.12 > 0.05", "bnb_nf4": "KL 0.2313 > 0.05", "gptq": "KL 0.1801 > 0.05",
                                   "hqq": "KL 0.1854 > 0.05", "torchao_int4wo": "KL 0.2372 > 0.05"}
    assert D.decide(m, LOOSE)["memory"] == ["bnb_nf4"]  # 0.1117 GB against gptq's 0.1147: 2.6 % apart, no tie
    assert D.decide(m, {"kl_max": 0.01, "ppl_ratio_max": None, "acc_drop_pp": None})["memory"] == ["torchao_int8wo"]
    # a budget nothing but the 16-bit cells meet: the two have the same bytes, a tie said as one
    assert D.decide(m, {"kl_max": 0.003, "ppl_ratio_max": None, "acc_drop_pp": None})["memory"] == ["bf16", "fp16"]


def test_strict_asks_the_whole_ci():
    m = panel("gpu_smollm2")  # torchao_int8wo: KL 0.00378 [0.00360, 0.00397]
    budget = {"kl_max": 0.0039, "ppl_ratio_max": None, "acc_drop_pp": None}
    assert D.decide(m, {**budget, "strict": False})["memory"] == ["torchao_int8wo"]
    strict = D.decide(m, {**budget, "strict": True})
    assert strict["memory"] == ["bf16", "fp16"] and strict["excluded"]["torchao_int8wo"] == "KL 0.003973 > 0.0039"


def test_accuracy_budget_uses_the_paired_delta():
    m = panel("gpu_smollm2")  # hqq: MMLU -1.40 pp [-5.26, ...] against fp32 on the same 285 items
    assert D.decide(m, {"acc_drop_pp": 1.0})["excluded"] == {"hqq": "MMLU \u0394 \u22121.404 pp < \u22121"}
    assert "hqq" not in D.decide(m, {"acc_drop_pp": 2.0})["excluded"]
    assert D.decide(m, {"acc_drop_pp": 2.0, "strict": True})["excluded"]["hqq"].startswith("MMLU \u0394 \u22125.263 pp")


def test_decode_ties_are_overlapping_cis():
    m = panel("gpu_smollm2")
    f = {c["method"]: c["decode"]["1"] for c in m["cells"]}
    # the median's CI as the result stores it (5 runs: [min, max], 93.8 %)
    stored = json.loads((EXAMPLES / "gpu_smollm2" / "smollm2_135m__fp32" / "result.json").read_text())
    [fig] = [d for d in stored["metrics"]["latency"]["decode"] if d["batch_size"] == 1]
    assert f["fp32"]["path"] == "eager" and f["fp32"]["level"] == pytest.approx(0.9375)
    assert f["fp32"]["lo"] == fig["tokens_per_s"]["median_ci"]["low"]
    # fp32's [56.6, 60.7] tok/s clears fp16's [47.6, 52.0]; bf16's wide [34.2, 48.8] does not reach fp32 either
    assert f["fp32"]["lo"] > f["fp16"]["hi"] and f["bf16"]["hi"] < f["fp32"]["lo"]
    decode = D.decide(m, D.DEFAULT_BUDGET)["decode"]
    assert decode[1] == ["fp32"] and decode[32] == ["fp32", "fp16", "bf16"]  # at batch 32 the three CIs overlap
    # results written before the CI was stored: computed from the raw runs, the same rule
    old = panel("gpu_1b")
    g = {c["method"]: c["decode"]["1"] for c in old["cells"]}
    assert g["fp16"]["level"] == pytest.approx(0.9375) and g["fp16"]["lo"] > g["fp32"]["hi"]
    assert D.decide(old, {"kl_max": None, "ppl_ratio_max": None, "acc_drop_pp": None})["decode"][1] == ["fp16"]


def test_random_weights_are_not_judged_on_accuracy():
    m = panel("report_1b")  # random weights: MMLU/GSM8K at chance, no quality run
    assert m["random_weights"] and m["measured"] == {"kl": False, "ppl_ratio": False, "acc": []}
    answer = D.decide(m, {"acc_drop_pp": 0.0, "kl_max": 0.0, "ppl_ratio_max": 1.0})
    assert answer["excluded"] == {} and answer["memory"] == ["bnb_nf4"]
    assert sorted(answer["decode"]) == [1, 8, 32]


def test_a_cell_without_a_figure_others_have_is_left_out():
    m = panel("gpu_smollm2")
    nf4 = next(c for c in m["cells"] if c["method"] == "bnb_nf4")
    nf4["kl"] = None
    assert D.decide(m, LOOSE)["excluded"] == {"bnb_nf4": "KL not measured"}
    assert D.decide(m, {**LOOSE, "kl_max": None})["memory"] == ["bnb_nf4"]  # the constraint off: judged without


def test_claims_measured_saving_against_the_rule_of_thumb():
    m = panel("gpu_smollm2")
    assert m["reference"] == {"method": "bf16", "weights_gb": pytest.approx(0.269030016), "derived": False}
    nf4 = claim(m, "bnb_nf4")
    # 4-bit "saves 75 %"; SmolLM2 keeps its 28 M-parameter tied embedding in bf16: 58.5 % measured
    assert nf4["nominal_bits"] == 4 and nf4["rule_pct"] == 75.0
    assert nf4["saved_pct"] == pytest.approx(100 * (1 - 0.111691896 / 0.269030016))
    assert nf4["bits_per_weight"] == pytest.approx(8 * 111691896 / 134515008)
    assert nf4["per_bit"]["kl"] == pytest.approx(0.2313132 / (16 - nf4["bits_per_weight"]))
    assert claim(m, "bnb_int8")["nominal_bits"] == 8 and claim(m, "bnb_int8")["rule_pct"] == 50.0
    # the method's bits, not its layout's: torchao int4 on CUDA pads rows (tile_packed_to_4d) to 9.3 bits/weight
    int4 = claim(m, "torchao_int4wo")
    assert int4["nominal_bits"] == 4 and int4["rule_pct"] == 75.0 and int4["bits_per_weight"] > 9
    # GGUF types carry their width in their name; Q6_K stores 8.1 bits/weight on SmolLM2 (fallback rows)
    gguf = {k["method"]: k for k in panel("cpu_gguf")["claims"]}
    assert {q: gguf[f"gguf_{q}"]["nominal_bits"] for q in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m")} == {
        "q8_0": 8, "q6_k": 6, "q5_k_m": 5, "q4_k_m": 4, "q3_k_m": 3}
    assert gguf["gguf_q6_k"]["bits_per_weight"] > 8
    assert claim(m, "fp32")["rule_pct"] == -100.0 and claim(m, "bf16")["per_bit"] == {}


def test_claims_frontier_and_a_derived_reference():
    m = panel("cpu_new_methods")  # fp32 baseline, no 16-bit cell
    assert m["reference"]["derived"] and m["reference"]["weights_gb"] == pytest.approx(0.538060032 / 2)
    assert m["loss_metric"]["key"] == "kl"
    # torchao_int4wo: as heavy as hqq and more than bnb_nf4, with a larger KL than both
    assert claim(m, "torchao_int4wo")["front"] == {"on_front": False, "dominated_by": [
        {"method": "bnb_nf4", "within_ci": True}, {"method": "hqq", "within_ci": True}]}
    assert all(claim(m, x)["front"]["on_front"] for x in ("fp32", "torchao_int8wo", "hqq", "bnb_nf4"))
    D.add_text({"tasks": {}, "models": [m]})
    assert claim(m, "torchao_int4wo")["text"]["frontier"] == ("dominated by bnb_nf4 (quality within CI), "
                                                              "hqq (quality within CI)")


def test_page_carries_the_panel_and_its_data():
    results = T.load_results(EXAMPLES / "gpu_smollm2")
    page = H.render_sweep(results, "gpu_smollm2", plotlyjs=FAKE_PLOTLYJS)
    assert page.index('id="decision"') < page.index('id="quality"') < page.index('id="summary"')
    expected = json.loads(re.search(r'data-expected="([^"]*)"', page).group(1).replace("&#34;", '"'))
    assert expected["memory"] == ["bnb_int8", "torchao_int8wo"]
    data = json.loads(re.search(r'<script type="application/json" id="decision-data">(.*?)</script>', page,
                                re.S).group(1))
    assert data["budget"] == D.DEFAULT_BUDGET and data["models"][0]["cells"][0]["method"] == "fp32"
    claims = page.split('class="claims"')[1].split("</table>")[0]
    assert '<tr data-cell="smollm2_135m__bnb_nf4">' in claims and "58.5" in claims and "75.0" in claims


def test_hostile_names_stay_inert_in_the_decision_data():
    page = H.render_sweep(T.load_results(FIXTURES / "mixed"), "mixed", plotlyjs=FAKE_PLOTLYJS)
    data = re.search(r'id="decision-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and "\\u003cscript\\u003ealert(1)" in data
    assert "<h3><script>" not in page and "<h3>&lt;script&gt;alert(1)&lt;/script&gt; " in page


# ---------------------------------------------------------------- one site


def test_all_shares_one_plotly_and_indexes_every_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "get_plotlyjs", lambda: FAKE_PLOTLYJS)
    out = tmp_path / "reports"
    assert cli.main(["--all", str(EXAMPLES), "--out", str(out)]) == 0
    assert (out / "assets" / "plotly.min.js").read_text() == FAKE_PLOTLYJS
    sweeps = sorted(p.name for p in EXAMPLES.iterdir())
    for sweep in sweeps:
        page = (out / sweep / "index.html").read_text()
        assert '<script src="../assets/plotly.min.js"></script>' in page and FAKE_PLOTLYJS not in page
    index = (out / "index.html").read_text()
    row = index.split('href="gpu_smollm2/index.html"')[1].split("</tr>")[0]
    assert "2026-12-06" in row and "10 ok" in row and re.search(r">\s*bnb_int8 = torchao_int8wo\s*</td>", row)
    assert all(f'href="{s}/index.html"' in index for s in sweeps)


def test_a_single_report_embeds_plotly_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "get_plotlyjs", lambda: FAKE_PLOTLYJS)
    out = tmp_path / "reports"
    assert cli.main([str(FIXTURES / "demo"), "--out", str(out)]) == 0
    assert FAKE_PLOTLYJS in (out / "demo" / "index.html").read_text() and not (out / "assets").exists()
    assert cli.main([str(FIXTURES / "demo"), "--out", str(out), "--plotlyjs", "shared"]) == 0
    assert FAKE_PLOTLYJS not in (out / "demo" / "index.html").read_text()
    assert (out / "assets" / "plotly.min.js").is_file()
    # out is a site now: rebuilding one of its sweeps joins it rather than embedding plotly.js again
    assert cli.main([str(FIXTURES / "mixed"), "--out", str(out)]) == 0
    assert '<script src="../assets/plotly.min.js">' in (out / "mixed" / "index.html").read_text()
    assert cli.main([str(FIXTURES / "mixed"), "--out", str(out), "--plotlyjs", "inline"]) == 0
    assert FAKE_PLOTLYJS in (out / "mixed" / "index.html").read_text()


def test_committed_examples_are_one_small_site():
    """reports/examples: every sweep of runs/ has its page, all pages share one plotly.js (the one large file), and
    each sweep stays small: its page folder (page, tables, screenshot) under 250 kB + 60 kB a cell, its results
    under 100 kB a cell (a GPU cell with per-token latencies and per-item answers is 70-90 kB)."""
    root = EXAMPLES.parent

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    assert (root / "assets" / "plotly.min.js").is_file() and size(root / "assets") <= 5_000_000
    for sweep in EXAMPLES.iterdir():
        page = (root / sweep.name / "index.html").read_text()
        assert '<script src="../assets/plotly.min.js"></script>' in page and 'id="decision"' in page, sweep.name
        cells = len(list(sweep.glob("*/result.json")))
        assert cells and size(root / sweep.name) <= 250_000 + 60_000 * cells, f"reports/examples/{sweep.name}"
        assert size(sweep) <= 100_000 * cells, f"reports/examples/runs/{sweep.name}: {size(sweep)} bytes"
    pages = {p.name for p in root.iterdir() if p.is_dir()} - {"assets", "runs"}
    assert pages == {p.name for p in EXAMPLES.iterdir()}, "a page without its results, or results without a page"


def test_the_shared_asset_is_rewritten_only_when_it_changes(tmp_path):
    path = site.write_plotly_asset(tmp_path, plotlyjs="a")
    before = path.stat().st_mtime_ns
    assert site.write_plotly_asset(tmp_path, plotlyjs="a").stat().st_mtime_ns == before
    assert site.write_plotly_asset(tmp_path, plotlyjs="b").read_text() == "b"
