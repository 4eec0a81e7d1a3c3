"""The report (qbench.report) on hand-made result.json fixtures: tests/fixtures/runs/{mixed,demo}.

tests/fixtures/make_report_fixtures.py writes the fixtures; its docstring says what each cell exercises.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from qbench.report import charts as C
from qbench.report import cli
from qbench.report import html as H
from qbench.report import tables as T

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
MIXED, DEMO = FIXTURES / "mixed", FIXTURES / "demo"
HOSTILE_MODEL = "<script>alert(1)</script>"
HOSTILE_METHOD = '"</script><img src=x onerror=alert(1)>'
FAKE_PLOTLYJS = "/* plotly.js stand-in for fast tests */ window.Plotly = {newPlot: function () {}};"


@pytest.fixture
def results():
    return T.load_results(MIXED)


def by_cell(rows, model, method):
    [row] = [r for r in rows if r["model"] == model and r["method"] == method]
    return row


def fixture_items(cell_dir: str, task: str) -> str:
    return json.loads((MIXED / cell_dir / "result.json").read_text())["metrics"]["accuracy"]["items"][task]["correct"]


# ---------------------------------------------------------------- tables


def test_load_results_reads_every_cell(results):
    assert len(results) == 6
    assert {r["model"] for r in results} == {"llama3_8b", HOSTILE_MODEL}
    assert sum(r["status"] == "error" for r in results) == 1


def test_unreadable_result_becomes_an_error_cell(tmp_path):
    (tmp_path / "m__q").mkdir()
    (tmp_path / "m__q" / "result.json").write_text("{not json")
    [r] = T.load_results(tmp_path)
    assert (r["status"], r["error"]["class"], r["model"], r["method"]) == ("error", "unreadable", "m", "q")


def test_summary_memory_and_speed(results):
    rows = T.summary_rows(results)
    assert len(rows) == 6
    base = by_cell(rows, "llama3_8b", "bf16")
    nf4 = by_cell(rows, "llama3_8b", "bnb_nf4")
    assert base["is_baseline"] and base["compression_x"] == pytest.approx(1.0)
    assert nf4["weights_gb"] == pytest.approx(5.7)
    assert nf4["compression_x"] == pytest.approx(16.06 / 5.7)
    # peak = max over phases; the fixture's decode peak is weights + 1.07 GB KV + 1.5 GB
    assert base["peak_gb"] == pytest.approx(16.06 + 1.07 + 1.5) and base["peak_source"] == "allocator"
    assert base["bw_bound_pct"] == pytest.approx(72.0)
    assert 40 < base["decode_tps"] < 44 and base["prefill_prompt_tokens"] == 512
    assert nf4["decode_cv_high"] and not base["decode_cv_high"]
    gptq = by_cell(rows, "llama3_8b", "gptq_4bit")
    assert gptq["quantize_s"] == 612.0 and nf4["quantize_s"] is None


def test_summary_accuracy_delta_is_paired_by_doc_id(results):
    rows = T.summary_rows(results)
    nf4 = by_cell(rows, "llama3_8b", "bnb_nf4")
    # the fixture flips 3 wrong->right and 7 right->wrong of 100 MMLU items
    assert nf4["mmlu_delta_pp"] == pytest.approx(-4.0)
    assert nf4["mmlu_flip_pct"] == pytest.approx(10.0)
    assert nf4["mmlu_paired_n"] == 100 and nf4["mmlu_delta_source"] == "paired"
    assert nf4["mmlu_ci_low_pp"] < -4.0 < nf4["mmlu_ci_high_pp"]
    assert nf4["gsm8k_delta_pp"] == pytest.approx(-5.0)
    # gptq evaluated 20 items (doc_ids 95, 90, ..., 0): the paired delta compares those 20 items of both cells
    gptq = by_cell(rows, "llama3_8b", "gptq_4bit")
    b = "".join(fixture_items("llama3_8b__bf16", "mmlu")[i] for i in range(95, -1, -5))
    c = fixture_items("llama3_8b__gptq_4bit", "mmlu")
    n01 = sum(x == "0" and y == "1" for x, y in zip(b, c))
    n10 = sum(x == "1" and y == "0" for x, y in zip(b, c))
    assert (n01, n10) == (1, 2) and gptq["mmlu_flip_pct"] == pytest.approx(100 * 3 / 20)
    assert gptq["mmlu_paired_n"] == 20
    assert gptq["mmlu_delta_pp"] == pytest.approx(100 * (c.count("1") - b.count("1")) / 20)
    assert gptq["mmlu_limit"] == 20 and gptq["mmlu_n"] == 20 and gptq["mmlu_fewshot"] == 0
    assert by_cell(rows, "llama3_8b", "bf16")["mmlu_delta_pp"] is None


def test_summary_without_paired_module_falls_back_to_plain_difference(results, monkeypatch):
    monkeypatch.setattr(T, "load_paired_compare", lambda: None)
    gptq = by_cell(T.summary_rows(results), "llama3_8b", "gptq_4bit")
    assert gptq["mmlu_delta_source"] == "difference"
    base = by_cell(T.summary_rows(results), "llama3_8b", "bf16")
    assert gptq["mmlu_delta_pp"] == pytest.approx(gptq["mmlu_pct"] - base["mmlu_pct"])
    assert gptq["mmlu_ci_low_pp"] is None


def test_summary_error_and_random_cells(results):
    rows = T.summary_rows(results)
    err = by_cell(rows, "llama3_8b", "bnb_int8")
    assert (err["status"], err["error_class"], err["error_type"], err["error_phase"]) == \
        ("error", "oom", "OutOfMemoryError", "latency")
    assert "CUDA out of memory" in err["error_message"]
    assert err["decode_tps"] is None and err["mmlu_pct"] is None
    assert by_cell(rows, HOSTILE_MODEL, HOSTILE_METHOD)["random_weights"]
    assert not by_cell(rows, "llama3_8b", "bf16")["random_weights"]


def test_baseline_method_configured_then_fallbacks():
    """The configured baseline when it ran; else a method that quantized nothing, 16-bit before 32-bit (by what
    the results say, not by method names)."""
    dtypes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16"}

    def cell(m, base="bf16"):
        return {"method": m, "model": "x",
                "config": {"run": {"baseline_method": base}, "method": {"dtype": dtypes.get(m, "bfloat16")}},
                "metrics": {"memory": {"params_quantized_measured": 0 if m in dtypes else 1000}}}

    assert T.baseline_method([cell("bf16"), cell("nf4")]) == "bf16"
    assert T.baseline_method([cell("fp32"), cell("fp16"), cell("nf4")]) == "fp16"
    assert T.baseline_method([cell("fp32"), cell("half"), cell("nf4")]) == "half"  # any name: a 16-bit cast
    assert T.baseline_method([cell("fp32"), cell("nf4")]) == "fp32"
    assert T.baseline_method([cell("fp32", "nf4"), cell("nf4", "nf4")]) == "nf4"
    assert T.baseline_method([cell("int8")]) is None


def test_task_score_prefers_the_task_tables_headline():
    t = {"metrics": {"exact_match,flexible-extract": 0.6, "exact_match,strict-match": 0.5}}
    assert T.task_score(t, "gsm8k") == 0.5  # the table heads GSM8K by strict match
    assert T.task_score(t, "not_in_the_table") == 0.6  # else the first metric reported
    assert T.task_score({"value": 0.3, "metrics": {"exact_match,strict-match": 0.5}}) == 0.3
    assert T.task_score(None) is None


def test_align_items_by_doc_id():
    base = {"doc_ids": [0, 1, 2, 3], "correct": "1100"}
    cell = {"doc_ids": [3, 1], "correct": "10"}
    assert T.align_items(base, cell) == ("10", "01")
    assert T.align_items({"correct": "10"}, {"correct": "1"}) == ("", "")


def test_dist_stats_p10_from_values():
    s = T.dist_stats({"values": list(range(1, 12)), "mean": 6.0, "stdev": 3.3})
    assert s["p10"] == pytest.approx(2.0) and s["p50"] == 6.0 and s["p90"] == pytest.approx(10.0)
    assert s["cv"] == pytest.approx(0.55)
    assert T.dist_stats(None) == {}


def test_tidy_table_rows_and_columns(results, tmp_path):
    df = T.tidy_table(results)
    assert list(df.columns) == T.TIDY_COLUMNS
    assert set(df["cell"]) == {r["cell"] for r in results}
    err = df[df["cell"] == "llama3_8b__bnb_int8"]
    # wall_time_s + 4 non-null timings + 2 memory figures measured before the OOM
    assert len(err) == 7
    assert set(err["error_class"]) == {"oom"} and set(err["status"]) == {"error"}
    assert set(err["metric"]) >= {"wall_time_s", "weight_bytes_measured", "weight_bytes_analytic"}
    base = df[df["cell"] == "llama3_8b__bf16"]
    p50 = base[(base["metric"] == "decode.tokens_per_s") & (base["stat"] == "p50")]
    assert sorted(p50["batch_size"].tolist()) == [1, 8, 32] and set(p50["unit"]) == {"tokens/s"}
    cats = base[base["metric"] == "mmlu.category"]
    assert set(cats["category"]) == {"stem", "humanities", "social_sciences", "other"}
    mmlu = df[(df["metric"] == "mmlu.acc") & (df["cell"] == "llama3_8b__gptq_4bit")]
    assert mmlu["limit"].tolist() == [20.0] and mmlu["n_items"].tolist() == [20] and mmlu["num_fewshot"].tolist() == [0]
    assert df[df["model"] == HOSTILE_MODEL]["random_weights"].all()
    assert df["value"].dtype == "float64"

    paths = T.write_tables(results, tmp_path)
    csv = pd.read_csv(paths["tidy_csv"])
    pq = pd.read_parquet(paths["tidy_parquet"])
    assert len(csv) == len(pq) == len(df)
    assert list(pq.columns) == T.TIDY_COLUMNS
    assert pq.loc[pq["metric"] == "weight_bytes_measured", "value"].max() == pytest.approx(16.06e9)
    summary = pd.read_csv(paths["summary_csv"])
    assert len(summary) == 6 and "compression_x" in summary.columns


def test_tidy_table_has_a_row_per_time_budget_part(results):
    """timings.budget (where a cell's seconds went) reaches the CSV/Parquet as one row per part, in seconds."""
    import copy

    cell = copy.deepcopy(next(r for r in results if r["status"] == "ok"))
    budget = {"imports_s": 0.25, "load_s": 2.5, "latency_timed_s": 19.0, "quality_s": 1.5}
    cell.setdefault("timings", {})["budget"] = budget
    df = T.tidy_table([cell])
    parts = df[df["metric"].str.startswith("timings.budget.")]
    assert dict(zip(parts["metric"].str.removeprefix("timings.budget."), parts["value"])) == budget
    assert set(parts["unit"]) == {"s"} and set(parts["group"]) == {"run"}


# ---------------------------------------------------------------- charts


def test_pareto_front():
    pts = [(16.0, 67.0, "bf16"), (5.7, 63.0, "nf4"), (5.75, 55.0, "gptq"), (8.6, 66.0, "int8"), (9.0, 60.0, "x")]
    assert [p[2] for p in C.pareto_front(pts)] == ["nf4", "int8", "bf16"]


def test_charts_present_or_absent(results):
    rows = T.summary_rows(results)
    charts = C.build_charts(rows, results)
    assert [c["key"] for c in charts] == ["quality", "pareto", "throughput", "memory", "delta", "categories"]
    assert charts[0]["figure"] is None  # these fixtures predate quality (tests/test_report_quality.py has it)
    assert all(c["figure"] is not None for c in charts[1:])
    demo = T.load_results(DEMO)
    demo_charts = {c["key"]: c["figure"] for c in C.build_charts(T.summary_rows(demo), demo)}
    assert demo_charts["throughput"] is not None and demo_charts["memory"] is not None
    assert demo_charts["pareto"] is None and demo_charts["delta"] is None and demo_charts["categories"] is None


def test_memory_breakdown_adds_up(results):
    r = next(x for x in results if x["cell"] == "llama3_8b__bf16")
    parts = C.memory_parts(r, {})
    assert parts["weights"] == pytest.approx(16.06) and parts["KV cache"] == pytest.approx(32 * 33_554_432 / 1e9)
    assert parts["weights"] + parts["KV cache"] + parts["overhead"] == pytest.approx(parts["peak"])


def test_throughput_error_bars_from_dist(results):
    r = next(x for x in results if x["cell"] == "llama3_8b__bf16")
    pts = C.decode_series(r)["eager"]
    assert [p["batch_size"] for p in pts] == [1, 8, 32]
    assert all(p["lo"] <= p["p50"] <= p["hi"] for p in pts) and pts[0]["band"] == "p10\u2013p90"


# ---------------------------------------------------------------- html


@pytest.fixture
def mixed_page(results):
    return H.render_sweep(results, "mixed", plotlyjs=FAKE_PLOTLYJS)


def row_html(page: str, cell: str) -> str:
    from markupsafe import escape  # jinja2's own escaping, as the page uses
    m = re.search(r'<tr class="cell-row[^"]*" data-cell="' + re.escape(str(escape(cell))) + r'">(.*?)</tr>',
                  page, re.S)
    assert m, f"no summary row for {cell}"
    return m.group(1)


def test_script_json_is_inert():
    s = H.script_json({"name": '"</script><img src=x onerror=alert(1)>', "x": "<!--"})
    assert "<" not in s and ">" not in s and json.loads(s)["name"] == '"</script><img src=x onerror=alert(1)>'


def test_hostile_strings_are_escaped(mixed_page):
    page = mixed_page
    for raw in (HOSTILE_MODEL, HOSTILE_METHOD, "<img src=x", "onerror=alert(1)>"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&#34;&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    # executable scripts: exactly plotly.js and the page's own code; figures travel as inert JSON
    scripts = re.findall(r"<script(?P<attrs>[^>]*)>", page)
    assert sum(1 for a in scripts if "application/json" not in a) == 2
    assert not re.search(r"<script[^>]*\bsrc=", page)
    figs = re.findall(r'<script type="application/json" class="qb-fig" data-target="fig-(\w+)">(.*?)</script>',
                      page, re.S)
    assert [k for k, _ in figs] == ["pareto", "throughput", "memory", "delta", "categories"]
    for _, body in figs:
        fig = json.loads(body)
        assert fig["data"] and "layout" in fig
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in json.loads(figs[0][1])["layout"]["annotations"][0]["text"]


def test_summary_table_rows_marks_and_errors(mixed_page, results):
    page = mixed_page
    assert page.count('<tr class="cell-row') == 6
    err = row_html(page, "llama3_8b__bnb_int8")
    assert "error: oom" in err and "CUDA out of memory. Tried to allocate 2.00 GiB" in err
    # the error stays visible in the notes; warnings fold into a <details> so rows stay short
    assert '<td class="notes"><p class="status-error">OutOfMemoryError' in err and "<details>" not in err
    warned = next(r for r in results if r.get("warnings"))
    warned_notes = row_html(page, warned["cell"]).split('<td class="notes">', 1)[1]
    n = len(warned["warnings"])
    assert f"<details><summary>{n} note{'s' if n > 1 else ''}</summary><ul>" in warned_notes
    assert warned_notes.count("<li>") == n
    hostile = row_html(page, f"{HOSTILE_MODEL}__bf16")
    # every accuracy number of a random-weight cell carries the dagger
    assert hostile.count('<sup class="mark" title="random weights') == 1  # MMLU % (baseline: no delta)
    evil = row_html(page, f"{HOSTILE_MODEL}__{HOSTILE_METHOD}")
    assert evil.count('<sup class="mark" title="random weights') == 3  # MMLU %, its delta, its flips
    gptq = row_html(page, "llama3_8b__gptq_4bit")
    assert gptq.count("limited evaluation: limit 20.00, 20 items") >= 2
    nf4 = row_html(page, "llama3_8b__bnb_nf4")
    assert "coefficient of variation" in nf4
    assert re.search(r'<td class="num best" data-v="5.7">', nf4)  # lightest weights of llama3_8b
    row = by_cell(T.summary_rows(results), "llama3_8b", "bnb_nf4")
    ci = f"[{H.fmt_num(row['mmlu_ci_low_pp'], 1, True)}, {H.fmt_num(row['mmlu_ci_high_pp'], 1, True)}]"
    assert f"\u22124.0 {ci}" in nf4  # delta with its paired CI
    assert 'class="num best"' not in err
    assert "Weights<span class=\"unit\">GB</span>" in page
    assert "tokens/s, p50 \u00b1 95 % CI, eager" in page


def test_honesty_panel(mixed_page):
    page = mixed_page
    honesty = page[page.index('id="honesty"'):page.index('id="environment"')]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;__bf16" in honesty  # random weights cell listed
    assert re.search(r"<td>llama3_8b__gptq_4bit</td><td>mmlu</td><td class=\"num\">20</td><td class=\"num\">20</td>",
                     honesty)
    assert "decode eager bs=1: CV 12% above 5%" in honesty
    assert "<b>driver</b>" in honesty and "575.51.03" in honesty and "<b>transformers</b>" in honesty
    assert "mixed</span> &mdash; 5-shot:" in honesty and "0-shot: llama3_8b__gptq_4bit" in honesty
    assert "demo-banner" not in page


def test_environment_and_provenance(mixed_page):
    page = mixed_page
    env = page[page.index('id="environment"'):]
    assert "qbench -m experiment=mixed" in env and "NVIDIA H100 80GB HBM3" in env and "3f2c9e1a7b" in env
    assert "Calibration data" in env and "&#34;n_tokens&#34;: 65536" in env
    assert env.count("<details><summary><b>") == 6


def test_demo_sweep_banner_and_absent_charts(monkeypatch):
    demo = T.load_results(DEMO)
    page = H.render_sweep(demo, "demo", plotlyjs=FAKE_PLOTLYJS)
    assert 'id="demo-banner"' in page and "the demo model is tiny and random: accuracy and speed mean nothing" in page
    assert page.count("Not measured in this sweep.") == 3
    assert "Accuracy (lm-eval tasks): not measured in this sweep." in page
    assert 'data-expected-charts="2"' in page and 'data-expected-rows="2"' in page
    bf16 = row_html(page, "tiny__bf16")
    assert " RSS" in bf16  # CPU peak comes from RSS and says so
    assert ">0.0021<" in bf16  # a tiny footprint is not rounded to 0.00
    fp32 = row_html(page, "tiny__fp32")
    # both cells tie on peak memory: no star; fp32 is the only non-baseline compression: no star
    assert '<td class="num" data-v="0.41">0.41 RSS' in bf16 and '<td class="num" data-v="0.41">0.41 RSS' in fp32
    assert '<td class="num" data-v="0.5">0.50</td>' in fp32
    assert '<td class="num best" data-v="0.0021">' in bf16  # half the weights of fp32: the lightest


# ---------------------------------------------------------------- CLI


def test_cli_builds_every_sweep_and_index(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(H, "get_plotlyjs", lambda: FAKE_PLOTLYJS)
    out = tmp_path / "reports"
    assert cli.main(["--all", str(FIXTURES), "--out", str(out)]) == 0
    for sweep in ("mixed", "demo"):
        for f in ("index.html", "results_tidy.csv", "results_tidy.parquet", "summary.csv", "report.json"):
            assert (out / sweep / f).is_file(), f
    index = (out / "index.html").read_text()
    assert 'href="mixed/index.html"' in index and 'href="demo/index.html"' in index
    assert "1 failed" in index and "&lt;script&gt;" in index and "<script>alert" not in index
    meta = json.loads((out / "mixed" / "report.json").read_text())
    assert (meta["n_cells"], meta["n_ok"], meta["n_error"], meta["n_charts"]) == (6, 5, 1, 5)


def test_cli_single_sweep_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "get_plotlyjs", lambda: FAKE_PLOTLYJS)
    out = tmp_path / "r"
    assert cli.main([str(DEMO), "--out", str(out)]) == 0
    assert (out / "demo" / "index.html").is_file() and (out / "index.html").is_file()
    empty = tmp_path / "empty_sweep"
    empty.mkdir()
    assert cli.main([str(empty), "--out", str(out)]) == 1
    assert cli.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert cli.main(["--all", str(empty), "--out", str(out)]) == 2


def test_real_page_embeds_plotly_once(results, tmp_path):
    page_path = H.build_sweep_report(MIXED, tmp_path)
    page = page_path.read_text()
    from plotly.offline import get_plotlyjs
    js = get_plotlyjs()
    assert page.count(js[:200]) == 1 and js in page
    assert "cdn.plot.ly" not in page.replace(js, "")
