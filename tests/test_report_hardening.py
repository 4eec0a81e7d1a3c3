"""The report on results a new user produced: badly shaped files, static decode, error rows, CPU sweeps,
methods that quantized little (issue 16)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from qbench.report import cli
from qbench.report import html as H
from qbench.report import tables as T
from tests.test_report import DEMO, FAKE_PLOTLYJS, MIXED, row_html


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, fn) -> None:
    r = json.loads(path.read_text())
    fn(r)
    path.write_text(json.dumps(r))


@pytest.fixture(autouse=True)
def no_plotly(monkeypatch):
    monkeypatch.setattr(H, "get_plotlyjs", lambda: FAKE_PLOTLYJS)


@pytest.mark.parametrize("bad", [{"metrics": {"memory": "oops"}}, {"environment": "x"}, {"timings": []},
                                 {"metrics": {"latency": {"decode": {"a": 1}}}}, {"warnings": "text"},
                                 # a declared field of the wrong type: the typed result's check, as the writer's
                                 {"metrics": {"latency": {"decode": [{"decode_path": "eager", "batch_size": "8"}]}}},
                                 {"error": {"class": 3}}])
def test_badly_shaped_result_is_an_unreadable_row_and_the_rest_builds(tmp_path, bad):
    sweep = _copy(DEMO, tmp_path / "runs" / "demo")
    _edit(sweep / "tiny__fp32" / "result.json", lambda r: r.update(bad))
    page = H.build_sweep_report(sweep, tmp_path / "reports").read_text()
    fp32 = row_html(page, "tiny__fp32")
    assert "error: unreadable" in fp32 and "expected" in fp32
    assert "error" not in row_html(page, "tiny__bf16").split('<td class="notes">')[0]


def test_a_result_that_breaks_any_later_stage_becomes_unreadable(tmp_path, monkeypatch):
    sweep = _copy(DEMO, tmp_path / "runs" / "demo")
    real = T._tidy_cell

    def tidy(r):  # a shape load_results does not know of, tripping a later stage
        if r["cell"] == "tiny__fp32" and r["status"] == "ok":
            raise AttributeError("'str' object has no attribute 'get'")
        return real(r)

    monkeypatch.setattr(T, "_tidy_cell", tidy)
    page = H.build_sweep_report(sweep, tmp_path / "reports").read_text()
    assert "AttributeError: &#39;str&#39; object has no attribute &#39;get&#39;" in row_html(page, "tiny__fp32")
    assert "error: unreadable" not in row_html(page, "tiny__bf16")


def test_all_goes_on_past_a_sweep_that_cannot_be_built(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    _copy(DEMO, runs / "a_first")
    _copy(MIXED, runs / "b_second")
    real = H.build_sweep_report

    def build(sweep, out, **kw):
        if Path(sweep).name == "a_first":
            raise TypeError("unexpected")
        return real(sweep, out, **kw)

    monkeypatch.setattr(H, "build_sweep_report", build)
    assert cli.main(["--all", str(runs), "--out", str(tmp_path / "reports")]) == 1
    assert (tmp_path / "reports" / "b_second" / "index.html").is_file()
    assert "a_first: not built: TypeError: unexpected" in capsys.readouterr().err


def _with_static(r, static_tps=129.0, eager_tps=43.0):
    eager = next(d for d in r["metrics"]["latency"]["decode"] if d["batch_size"] == 1)
    for d in r["metrics"]["latency"]["decode"]:
        if d["decode_path"] == "eager" and d["batch_size"] == 1:
            d["tokens_per_s"] = {"p50": eager_tps, "mean": eager_tps, "cv": 0.01}
    static = copy.deepcopy(eager)
    static.update(decode_path="static", tokens_per_s={"p50": static_tps, "mean": static_tps, "cv": 0.01})
    r["metrics"]["latency"]["decode"].append(static)


def test_decode_column_leads_with_static_and_shows_eager_beside_it(tmp_path):
    sweep = _copy(DEMO, tmp_path / "demo")
    _edit(sweep / "tiny__bf16" / "result.json", _with_static)
    results = T.load_results(sweep)
    bf16 = next(r for r in T.summary_rows(results) if r["method"] == "bf16")
    assert (bf16["decode_tps"], bf16["decode_path"], bf16["decode_eager_tps"]) == (129.0, "static", 43.0)
    fp32 = next(r for r in T.summary_rows(results) if r["method"] == "fp32")
    assert fp32["decode_path"] == "eager"  # no static measured there: eager, and it says so
    page = H.render_sweep(results, "demo", plotlyjs=FAKE_PLOTLYJS)
    assert "tokens/s, p50 \u00b1 95 % CI, static where measured, else eager" in page
    assert "Decode bs 1, eager" in page
    row = row_html(page, "tiny__bf16")
    assert ">129.0 static<" in row and ">43.0<" in row
    throughput = next(c for c in H.C.build_charts(T.summary_rows(results), results) if c["key"] == "throughput")
    names = {t.name for t in throughput["figure"].data}
    assert {"bf16 (static)", "bf16 (eager)", "fp32 (eager)"} <= names


def test_error_row_is_the_cause_in_one_line(tmp_path):
    sweep = _copy(DEMO, tmp_path / "demo")
    tail = ("s/threadx.py\", line 311, in run\n    result = fn(*args)\n" * 40
            + "ValueError: Expected in_features (576) to be divisible by group_size (128)")

    def fail(r):
        r["status"] = "error"
        r["error"] = {"class": "exception", "type": "RuntimeError", "phase": "load", "traceback": "Traceback ...",
                      "message": f"gptq quantization of /x failed (exit code 1): {tail}"}

    _edit(sweep / "tiny__fp32" / "result.json", fail)
    results = T.load_results(sweep)
    row = next(r for r in T.summary_rows(results) if r["method"] == "fp32")
    assert row["error_message"] == "ValueError: Expected in_features (576) to be divisible by group_size (128)"
    notes = row_html(H.render_sweep(results, "demo", plotlyjs=FAKE_PLOTLYJS), "tiny__fp32").split('"notes">')[1]
    assert "threadx" not in notes and "group_size (128)" in notes


def test_cpu_sweep_does_not_claim_the_same_gpu(tmp_path):
    page = H.render_sweep(T.load_results(DEMO), "demo", plotlyjs=FAKE_PLOTLYJS)
    honesty = page[page.index('id="honesty"'):page.index('id="environment"')]
    assert "same GPU, driver, CUDA" not in honesty and "CPU of the same host" in honesty
    mixed = H.render_sweep(T.load_results(MIXED), "mixed", plotlyjs=FAKE_PLOTLYJS)
    assert "CPU of the same host" not in mixed


def test_unquantized_share_and_memory_model_mismatch_are_shown(tmp_path):
    sweep = _copy(DEMO, tmp_path / "demo")

    def moe(r):
        r["config"]["method"]["dtype"] = "bfloat16"
        r["metrics"]["memory"].update(bits_per_weight_quantized=4.127, quantized_params_fraction=0.07,
                                      quantized_bytes_fraction=0.02, decoder_unquantized_fraction=0.93,
                                      weight_measured_over_analytic=0.93)

    _edit(sweep / "tiny__fp32" / "result.json", moe)
    _edit(sweep / "tiny__bf16" / "result.json", lambda r: r["metrics"]["memory"].update(
        quantized_params_fraction=0.0, quantized_bytes_fraction=0.0, decoder_unquantized_fraction=1.0))
    page = H.render_sweep(T.load_results(sweep), "demo", plotlyjs=FAKE_PLOTLYJS)
    assert "Quantized<span class=\"unit\">% of weights: params (bytes)" in page
    fp32 = row_html(page, "tiny__fp32")
    assert ">7.0 (2.0)<" in fp32
    assert "93.0 % of the decoder layers&#39; weights stay unquantized" in fp32
    assert "measured / analytic weight bytes = 0.930" in fp32
    panel = page[page.index('id="memory-accounting"'):page.index('id="environment"')]
    assert "tiny__fp32" in panel and "tiny__bf16" not in panel  # bf16 quantizes nothing by design


def test_a_switch_one_methods_library_flipped_shows_as_mixed(tmp_path):
    """A library that changes a process-wide switch for its own cells (GPT-QModel's allocator, torchao's Inductor
    tuning) makes those cells incomparable: the report's mixed-environment panel names the switch and the cells.
    A cell that recorded nothing about it (no latency section, an older result) is not counted as differing."""
    sweep = _copy(DEMO, tmp_path / "demo")
    a, b = sorted(p.name for p in sweep.iterdir() if (p / "result.json").exists())
    keys = {"inductor_coordinate_descent_tuning", "PYTORCH_ALLOC_CONF"}

    def setting(tuning, alloc):
        def fn(r):
            r["metrics"]["latency"]["torch_settings"] = {"inductor_coordinate_descent_tuning": tuning}
            r["environment"].setdefault("variables", {})["PYTORCH_ALLOC_CONF"] = alloc
        return fn

    def unrecorded(r):
        r["metrics"]["latency"].pop("torch_settings", None)
        r["environment"].get("variables", {}).pop("PYTORCH_ALLOC_CONF", None)

    def mixed():
        results = T.load_results(sweep)
        return {m["key"]: m for m in H.honesty_view(results, T.summary_rows(results))["mixed"]}

    _edit(sweep / a / "result.json", setting(True, "expandable_segments:True"))
    _edit(sweep / b / "result.json", setting(False, "expandable_segments:False"))
    found = mixed()
    for key in keys:
        assert {v["value"]: v["cells"] for v in found[key]["values"]} in (
            {"True": [a], "False": [b]}, {"expandable_segments:True": [a], "expandable_segments:False": [b]}), key
    _edit(sweep / b / "result.json", unrecorded)
    assert not keys & set(mixed())
    _edit(sweep / b / "result.json", setting(True, "expandable_segments:True"))
    assert not keys & set(mixed())


def test_compiled_paths_skipped_by_choice_are_said_to_be(tmp_path):
    """A cell whose static and graph ran at some batch sizes only (bench.compiled_batch_sizes) says so beside
    the tables, which would otherwise look the same as a failure; a cell that ran them everywhere, or whose method
    never runs them, is not listed."""
    sweep = _copy(DEMO, tmp_path / "demo")
    cells = sorted(p.parent.name for p in sweep.glob("*/result.json"))
    a, b = cells[:2]

    def settings(compiled, unsupported=()):
        def fn(r):
            lat = r["metrics"]["latency"]
            lat.setdefault("settings", {}).update(batch_sizes=[1, 8, 32], compiled_batch_sizes=compiled,
                                                  decode_paths=["eager", "static", "graph"])
            lat["unsupported"] = [{"decode_path": p, "reason": "cannot", "batch_size": None} for p in unsupported]
        return fn

    def not_run():
        results = T.load_results(sweep)
        return H.honesty_view(results, T.summary_rows(results))["not_run"]

    _edit(sweep / a / "result.json", settings([1]))
    _edit(sweep / b / "result.json", settings([1], unsupported=("static", "graph")))
    listed = [{"cell": a, "paths": ["static", "graph"], "compiled": [1], "skipped": [8, 32]}]
    assert not_run() == listed
    _edit(sweep / b / "result.json", settings([1, 8, 32]))
    assert not_run() == listed
    _edit(sweep / b / "result.json", settings(None))  # null: every batch size
    assert not_run() == listed
    page = H.build_sweep_report(sweep, tmp_path / "reports").read_text()
    assert (f"{a}: static and graph ran at batch 1 only, not at 8, 32 (<code>bench.compiled_batch_sizes</code>)"
            in page)
