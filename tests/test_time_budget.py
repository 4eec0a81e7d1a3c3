"""Every second of a cell accounted for: timings.budget (qbench/measure/budget.py, qbench/run/cell.py), the
collection hooks of qbench/measure/timing.py, and the report's "Where the time went" (qbench/report/time_budget.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.measure import timing
from qbench.measure.budget import MEASURING, CellClock, overhead_s
from qbench.report import time_budget as TB

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_laps_add_up_to_the_wall_time_and_process_start_comes_from_the_spawn():
    fake = FakeClock()
    clock = CellClock(spawned_unix=1000.0, first_line=(1002.5, 100.0), clock=fake)  # 2.5 s to the first line
    fake.t = 101.0
    clock.lap("startup_s")
    fake.t = 111.0
    clock.lap("load_s")
    clock.split("load_s", {"quantize_s": 6.0, "kernel_compile_s": 3.0})
    fake.t = 120.0
    clock.lap("latency_s")
    clock.split("latency_s", {"latency_compile_s": 0.0, "latency_warmup_s": 2.0, "latency_timed_s": 5.0},
                rest="latency_other_s")
    wall = clock.wall_s()
    budget = clock.budget(wall)
    assert wall == pytest.approx(22.5)
    assert budget == pytest.approx({"process_start_s": 2.5, "startup_s": 1.0, "quantize_s": 6.0,
                                    "kernel_compile_s": 3.0, "load_s": 1.0, "latency_warmup_s": 2.0, "latency_timed_s": 5.0,
                                    "latency_other_s": 2.0, "unaccounted_s": 0.0})
    assert sum(budget.values()) == pytest.approx(wall)
    assert overhead_s(budget, wall) == pytest.approx(22.5 - 7.0)


def test_parts_that_claim_more_than_their_step_are_scaled_to_it():
    """A library's clock around more than the step (a quantize_s that includes a subprocess's own start) must not
    make the budget add up to more than the wall time."""
    fake = FakeClock()
    clock = CellClock(clock=fake)
    fake.t = 104.0
    clock.lap("load_s")
    clock.split("load_s", {"quantize_s": 6.0, "kernel_compile_s": 2.0})
    budget = clock.budget(clock.wall_s())
    assert budget["quantize_s"] == pytest.approx(3.0) and budget["kernel_compile_s"] == pytest.approx(1.0)
    assert budget["load_s"] == pytest.approx(0.0) and budget["unaccounted_s"] == pytest.approx(0.0)


def test_collect_sums_warmups_timed_runs_and_compiles_without_counting_twice():
    """The static path compiles inside its first warm-up (a deadline block): those seconds are compile, not
    warm-up. Fake durations through repeat's clock."""
    t = [0.0]

    def clock():
        return t[0]

    calls = [0]

    def run_once():
        calls[0] += 1
        if calls[0] == 1:
            with timing.deadline(None, "compile"):
                t[0] += 10.0  # the compile, in the first call
        t[0] += 1.0
        return 1.0

    real = timing.time.perf_counter
    timing.time.perf_counter = clock  # deadline's own clock
    try:
        with timing.collect() as spent:
            res = timing.repeat(run_once, warmup_runs=2, min_repeats=3, max_repeats=3, min_duration_s=0, clock=clock)
    finally:
        timing.time.perf_counter = real
    assert res["warmup_s"] == [11.0, 1.0] and res["timed_s"] == 3.0
    assert spent.as_dict() == {"warmup_s": 2.0, "timed_s": 3.0, "bounded_s": 10.0, "figures": 1}
    with timing.collect() as idle:
        pass
    assert idle.as_dict()["figures"] == 0  # nothing collected outside its block


def _result(cell, status="ok", **budget):
    return {"cell": cell, "model": "m", "method": cell.split("__")[1], "status": status,
            "timings": {"budget": budget}}


def test_report_frame_groups_and_sweep_total():
    results = [_result("m__bf16", imports_s=5.0, load_s=2.0, latency_timed_s=10.0, eval_requests_s=3.0,
                       unaccounted_s=0.1),
               _result("m__gptq", "error", imports_s=5.0, kernel_compile_s=120.0, quantize_s=62.0,
                       quantize_other_s=18.0),
               {"cell": "m__old", "model": "m", "method": "old", "status": "ok", "timings": {"load_s": 3.0}}]
    frame = TB.budget_frame(results)
    assert list(frame.columns) == TB.COLUMNS and set(frame["cell"]) == {"m__bf16", "m__gptq"}  # no budget, no bar
    table = TB.by_group(frame)
    assert table.loc["m__gptq", "kernel builds and compile"] == 120.0
    assert table.loc["m__bf16", "other"] == pytest.approx(0.1)
    totals = TB.sweep_totals(frame)
    assert totals.loc["start-up and imports", "seconds"] == 10.0
    assert totals["share_pct"].sum() == pytest.approx(100.0)
    (chart,) = TB.charts(results)
    assert chart["key"] == "time_budget" and "2 cells, 3.8 min" in chart["caption"]
    bars = [t for t in chart["figure"].data if t.name == "quantize"]
    assert list(bars[0].y) == ["m__bf16", "m__gptq"] and bars[1].x[0] == pytest.approx(80 / 60)  # 62 + 18 s
    assert TB.charts(results[2:]) == []  # results from before the budget: no chart, no empty frame


def test_the_load_splits_into_the_quantizers_parts():
    """A GPT-QModel load that quantized: its quantizing child's own clocks and the rest of its wall time (start,
    imports, save) are budget parts of their own, not load_s (36 s of an H200 gptq cell's load were hidden)."""
    from qbench.run.cell import _load_parts

    clock = CellClock(clock=iter([0.0, 60.0]).__next__)
    clock.lap("load_s")
    timings = {"quantize_s": 15.0, "quantize_cache_hit": False, "kernel_compile_s": 19.0, "quantize_other_s": 20.0}
    clock.split("load_s", _load_parts(timings))
    assert clock.parts == pytest.approx({"quantize_s": 15.0, "kernel_compile_s": 19.0, "quantize_other_s": 20.0,
                                         "load_s": 6.0})
    hit = _load_parts({"quantize_s": 15.0, "quantize_cache_hit": True, "kernel_compile_s": 1.0})
    assert hit == {"quantize_s": None, "kernel_compile_s": 1.0, "quantize_other_s": None}


def test_measuring_parts_are_budget_keys_the_cell_writes():
    from qbench.evaluate import quality

    cell = (REPO / "qbench" / "run" / "cell.py").read_text()
    written = {f"quality_{p}" for p in quality.TIME_PARTS}  # the cell prefixes the quality phase's own parts
    assert 'f"quality_{k}"' in cell
    for part in MEASURING:
        assert f'"{part}"' in cell or part in written, part
    grouped = {p for _, parts in TB.GROUPS.values() for p in parts}
    assert set(MEASURING) - {"memory_s"} <= grouped


@pytest.mark.slow
def test_a_real_cell_accounts_for_every_second(tmp_path):
    """Through the qbench command: the budget is in result.json, starts at the spawn, adds up to wall_time_s."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QBENCH_CACHE": str(cache),
           "PYTHONPATH": str(REPO)}
    args = ["model=tiny", "method=fp32", "bench=quick", "bench.batch_sizes=[1]", "bench.new_tokens=4",
            "bench.min_repeats=2", "bench.max_repeats=2", "bench.warmup_runs=1", "bench.prompt_tokens=[8]",
            "bench.decode_prompt_tokens=8", "bench.device=cpu", "eval=demo", "eval.quality.enabled=false",
            "run.sweep=s", f"run.runs_dir={runs}"]
    subprocess.run([sys.executable, "-m", "qbench", *args], cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=900)
    r = json.loads((runs / "s" / "tiny__fp32" / "result.json").read_text())
    t = r["timings"]
    budget = t["budget"]
    assert r["status"] == "ok"
    assert sum(budget.values()) == pytest.approx(r["wall_time_s"], abs=1.0)
    assert abs(budget["unaccounted_s"]) < 1.0
    assert budget["process_start_s"] > 0 and budget["imports_s"] > 0 and budget["cuda_context_s"] < 0.01  # CPU: no context to create
    for part in ("latency_warmup_s", "latency_timed_s", "eval_tasks_s", "eval_requests_s", "eval_model_calls_s"):
        assert budget[part] > 0, part
    assert budget["latency_warmup_s"] + budget["latency_timed_s"] + budget["latency_other_s"] == pytest.approx(
        t["latency_s"], abs=0.05)
    assert t["overhead_s"] == pytest.approx(r["wall_time_s"] - sum(budget.get(k, 0) for k in MEASURING))
    assert t["eval_request_cache"]["misses"] > 0 and "time_budget" not in r["metrics"]["accuracy"]


def test_the_quality_phase_says_where_its_seconds_went(tmp_path):
    """quality.run's parts: the forward passes and the live comparison (measuring), the text, the baseline's file
    and this cell's (overhead); they add up to the phase, and a compared cell's comparison is timed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.config import yaml_defaults
    from qbench.evaluate import quality
    from qbench.load import tiny

    cfg = yaml_defaults("eval", "quality").quality
    cfg.ctx_tokens, cfg.max_windows = 64, 4
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=16)).eval()
    tok, text, meta = tiny.build_tokenizer(), tiny.TINY_TEXT.read_text()[:30000], {"source": "t", "model_config_hash": "m"}
    base = quality.run(model, tok, cfg, text=text, cell_dir=tmp_path / "base", baseline_file=None, meta=meta)
    cand = quality.run(model, tok, cfg, text=text, cell_dir=tmp_path / "cand",
                       baseline_file=tmp_path / "base" / quality.LOGPROBS_FILE, meta=meta)
    for got, compared in ((base, False), (cand, True)):
        parts = got["time_parts_s"]
        assert set(parts) == set(quality.TIME_PARTS)
        assert parts["model_calls_s"] > 0 and parts["record_s"] > 0 and parts["write_s"] > 0 and parts["text_s"] > 0
        assert (parts["compare_s"] > 0) == compared and (parts["baseline_read_s"] > 0) == compared
        assert sum(parts.values()) <= got["eval_time_s"] + 1e-6  # the rest: summaries, scipy.stats' import
    assert cand["comparison"]["kl_divergence"]["mean"] == pytest.approx(0.0, abs=1e-6)

    # in the cell's budget the phase is split: the forwards and the comparison measure, the rest is overhead
    clock = CellClock(clock=iter([0.0, 10.0]).__next__)
    clock.lap("quality_s")
    clock.split("quality_s", {f"quality_{k}": v for k, v in {"model_calls_s": 4.0, "compare_s": 1.0, "record_s": 2.0,
                                                              "write_s": 1.0, "text_s": 0.5}.items()},
                rest="quality_other_s")
    assert overhead_s(clock.parts, 10.0) == pytest.approx(5.0)
    grouped = {p: g for g, (_, ps) in TB.GROUPS.items() for p in ps}
    assert grouped["quality_model_calls_s"] == grouped["quality_compare_s"] == "quality"
    assert {grouped[p] for p in ("quality_record_s", "quality_write_s", "quality_other_s")} == {"quality: text and files"}
