"""Decode paths are a registry (qbench/measure/decode_paths/): a new path is one module, and validation, the latency
loop and the report pick it up with no other file touched; Settings is BenchConfig's fields, declared once."""
from __future__ import annotations

import copy
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from qbench.config import BenchConfig, yaml_defaults
from qbench.errors import ConfigError
from qbench.load import tiny
from qbench.measure import decode_paths, latency, stats
from qbench.measure.latency.settings import NOT_RECORDED, Settings
from qbench.report import charts as C
from qbench.report import html as H
from qbench.report import tables as T
from qbench.run import preflight

MIXED = Path(__file__).parent / "fixtures" / "runs" / "mixed"
NEW = "twice_eager"  # the path a test registers: eager's generate, under another name and place in the order

NEW_PATH = '''
"""A test's decode path: plain generate, run after eager."""
from qbench.measure.decode_paths import _generate

LABEL = "eager again"
DESCRIPTION = "generate, a second time"
ORDER = 15
COMPILED = False
FIRST_CALL_COMPILES = False
PREPARED = []  # (batch, prompt tokens) of every prepare: the test checks the loop handed it its prompts


def prepare(t, s, ids, mask, compile_limit):
    PREPARED.append(tuple(ids.shape))

    def run():
        return _generate.generate_timed(t.model, ids, mask, s.new_tokens, "twice_eager", t.device,
                                        t.pad_token_id)["steps_s"]

    return run
'''


@pytest.fixture
def new_path(tmp_path, monkeypatch):
    """One module in a folder of the registry's package path: exactly what adding a file to the folder does."""
    (tmp_path / f"{NEW}.py").write_text(textwrap.dedent(NEW_PATH))
    monkeypatch.setattr(decode_paths, "__path__", [*decode_paths.__path__, str(tmp_path)])
    yield decode_paths.get(NEW)
    sys.modules.pop(f"{decode_paths.__name__}.{NEW}", None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.build(tmp_path_factory.mktemp("tiny") / "tiny")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cpu")
    return model, AutoTokenizer.from_pretrained(str(path))


def _bench(**kw):
    base = dict(batch_sizes=[1, 2], prompt_tokens=[8], decode_prompt_tokens=8, new_tokens=4, decode_paths=["eager"],
                warmup_runs=1, max_warmup_runs=1, min_repeats=2, max_repeats=2, min_duration_s=0.0,
                target_ci_pct=None, measure_copy_bandwidth=False)
    base.update(kw)
    return yaml_defaults("bench", "default", **base)  # conf/bench/default.yaml's values for the rest


def test_the_registry_is_the_folder():
    assert decode_paths.names() == ["eager", "static", "graph"]  # run order: graph replays static's step
    assert [decode_paths.compiled(p) for p in decode_paths.names()] == [False, True, True]
    assert decode_paths.get("graph").REPLAYS == "static"
    with pytest.raises(ConfigError, match=r"^bench.decode_paths: 'warp' is not one of eager, static, graph$"):
        decode_paths.get("warp")
    assert decode_paths.ordered(["graph", "eager", "graph"]) == ["eager", "graph"]
    assert decode_paths.label("a_path_of_an_old_result") == "a_path_of_an_old_result"  # the report still reads it


def test_a_new_path_is_one_module(new_path):
    assert decode_paths.names() == ["eager", NEW, "static", "graph"]
    assert decode_paths.ordered([NEW, "graph", "eager"]) == ["eager", NEW, "graph"]
    cfg = type("Cfg", (), {"bench": _bench(decode_paths=[NEW, "eager"])})()
    preflight.check_decode_paths(cfg)  # validation knows it
    cfg.bench.decode_paths = [NEW, "eagre"]
    with pytest.raises(ConfigError, match="bench.decode_paths: 'eagre' is not one of eager, twice_eager, static"):
        preflight.check_decode_paths(cfg)
    # an uncompiled path: warm-up warmup_runs only, the max_time_per_figure_s cap (it names no cap of its own)
    s = Settings.from_bench(_bench(decode_paths=[NEW], max_warmup_runs=6, max_time_per_figure_s=10))
    assert s.loop(NEW)["max_warmup_runs"] == 1 and s.cap(NEW) == ("max_time_per_figure_s", 10.0)


def test_a_new_path_runs_through_latency_and_shows_in_the_report(new_path, tiny_model):
    model, tok = tiny_model
    section = latency.measure(model, tok, _bench(decode_paths=[NEW, "eager"]), "cpu", None, 1, model.config)
    assert section["settings"]["decode_paths"] == ["eager", NEW]
    assert [(d["decode_path"], d["batch_size"]) for d in section["decode"]] == \
        [("eager", 1), (NEW, 1), ("eager", 2), (NEW, 2)]
    assert new_path.PREPARED == [(1, 8), (2, 8)]
    mine = [d for d in section["decode"] if d["decode_path"] == NEW]
    assert all(d["tokens_per_s"]["p50"] > 0 and not d["compiled"] and d["graph_breaks"] is None for d in mine)
    assert section["unsupported"] == [] and section["one_time"]["compile_s"] is None

    # a cell of a sweep with this section, and the compiled paths beside it (the gap table needs graph)
    results = T.load_results(MIXED)
    cell = copy.deepcopy(next(r for r in results if r["status"] == "ok" and r["method"] == "bf16"))
    mine_bs1 = copy.deepcopy(mine[0])
    mine_bs1["tokens_per_s"] = stats.summarize([50.0, 51.0, 52.0, 53.0, 54.0, 55.0], "tokens/s")
    cell["metrics"]["latency"]["decode"] = [mine_bs1] + [_row(p, v) for p, v in (("static", 129.0), ("graph", 157.0))]
    results = [r for r in results if r["cell"] != cell["cell"]] + [cell]
    tidy = T.tidy_table(results)
    assert NEW in set(tidy.loc[tidy["cell"] == cell["cell"], "decode_path"])
    assert NEW in C.decode_series(cell)
    gap = next(g for g in T.decode_gap_rows(results) if g["cell"] == cell["cell"])
    assert gap[f"{NEW}_tps"] == 52.5
    page = H.render_sweep(results, "mixed", plotlyjs="window.Plotly = {newPlot: function () {}};")
    assert '<th>eager again<span class="unit">generate, a second time</span></th>' in page
    assert "52.5 \u00b1" in page


def _row(path, p50):
    values = [p50 - 1, p50, p50, p50, p50, p50 + 1]
    tps = stats.summarize(values, "tokens/s")
    return {"decode_path": path, "batch_size": 1, "prompt_tokens": 128, "new_tokens": 64, "tokens_per_s": tps,
            "per_token_ms": stats.summarize([1e3 / v for v in values], "ms"), "bandwidth_bound_tokens_per_s": 200.0,
            "bandwidth_bound_fraction": p50 / 200.0, "measured_bandwidth_bound_tokens_per_s": 180.0,
            "measured_bandwidth_bound_fraction": p50 / 180.0, "compiled": True,
            "precision": {"target_ci_pct": 1.0, "ci_half_width_pct": tps["median_ci"]["half_width_pct"],
                          "stopped_by": "precision", "repeats": len(values)}}


def test_settings_are_the_bench_schema_declared_once():
    """Settings adds no field of its own and re-declares none: BenchConfig's fields are its fields, and
    result.json's latency.settings keeps the keys it has always had."""
    assert [f.name for f in fields(Settings)] == [f.name for f in fields(BenchConfig)]
    assert "__annotations__" not in vars(Settings) or not vars(Settings)["__annotations__"]
    s = Settings.from_bench(_bench(decode_paths=["graph", "eager", "static"], compiled_batch_sizes=None,
                                   max_time_per_figure_s=10, warmup_runs=3, max_warmup_runs=1))
    assert set(s.record()) == {
        "batch_sizes", "prompt_tokens", "decode_prompt_tokens", "new_tokens", "decode_paths", "compiled_batch_sizes",
        "warmup_runs", "max_warmup_runs", "warmup_steady_pct", "min_repeats", "max_repeats", "min_duration_s",
        "target_ci_pct", "max_time_per_figure_s", "max_time_per_eager_figure_s", "max_compile_s",
        "cv_warn_threshold", "seed", "measure_copy_bandwidth"}
    assert not set(NOT_RECORDED) & set(s.record())
    # resolved once: registry order, null -> every batch size, warm-ups at least warmup_runs, the schema's types
    assert s.decode_paths == ["eager", "static", "graph"] and s.compiled_batch_sizes == [1, 2]
    assert s.max_warmup_runs == 3 and isinstance(s.max_time_per_figure_s, float)
