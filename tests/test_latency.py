"""Timing loop bounds, roofline arithmetic, forced generation length, and the latency section on CPU."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time

import pytest
import torch

from qbench.config import yaml_defaults
from qbench.load import tiny
from qbench.measure import gpu_specs, latency, memory, timing
from qbench.measure.decode_paths import _generate, graph
from qbench.measure.latency import common, decode, prefill
from qbench.measure.latency.settings import Settings

# ---- the repeat loop -----------------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when the fake workload runs: the loop's decisions become exact."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def workload(clock, seconds, log):
    def run():
        clock.t += seconds
        log.append(seconds)
        return len(log)

    return run


def test_repeat_min_repeats_when_runs_are_long():
    clock, log = FakeClock(), []
    r = timing.repeat(workload(clock, 0.5, log), warmup_runs=2, min_repeats=10, max_repeats=100,
                      min_duration_s=1.0, clock=clock)
    assert r["n"] == 10 and len(log) == 12  # 2 warm-ups discarded, then min_repeats rule
    assert r["results"] == list(range(3, 13))  # warm-up results are not among the values
    assert r["first_call_s"] == 0.5 and r["warmup_s"] == [0.5, 0.5]
    assert r["timed_s"] == pytest.approx(5.0)


def test_repeat_min_duration_when_runs_are_short():
    clock, log = FakeClock(), []
    r = timing.repeat(workload(clock, 0.01, log), warmup_runs=1, min_repeats=10, max_repeats=1000,
                      min_duration_s=1.0, clock=clock)
    assert r["n"] == 100  # 10 runs give only 0.1 s: repeat until 1.0 s is timed
    assert r["timed_s"] == pytest.approx(1.0)


def test_repeat_max_repeats_caps():
    clock, log = FakeClock(), []
    r = timing.repeat(workload(clock, 0.01, log), warmup_runs=0, min_repeats=3, max_repeats=20,
                      min_duration_s=60.0, clock=clock)
    assert r["n"] == 20 and r["first_call_s"] is None  # no warm-up: the first call is among the values


def test_repeat_real_sleep():
    t0 = time.perf_counter()
    r = timing.repeat(lambda: time.sleep(0.01), warmup_runs=1, min_repeats=3, max_repeats=50, min_duration_s=0.1)
    assert 3 <= r["n"] < 50 and r["timed_s"] >= 0.1
    assert time.perf_counter() - t0 >= 0.11
    with pytest.raises(ValueError):
        timing.repeat(lambda: None, warmup_runs=0, min_repeats=5, max_repeats=2, min_duration_s=0)


def test_time_call_cpu():
    secs, result = timing.time_call(lambda: (time.sleep(0.02), 7)[1], "cpu")
    assert result == 7 and 0.02 <= secs < 0.5


# ---- roofline arithmetic -------------------------------------------------------------------------------


def test_bandwidth_bound():
    h100 = gpu_specs.bandwidth_bytes_per_s(gpu_specs.lookup("NVIDIA H100 80GB HBM3"))
    # Llama-3.1-8B bf16: 16,060,522,496 weight bytes of which a step reads all but the 1,050,673,152-byte
    # embedding table; KV 131,072 bytes per token, mean context 128 + 128/2 = 192 tokens
    weights = 16_060_522_496 - 1_050_673_152
    kv_seq = 131_072 * decode.mean_decode_context(128, 128)
    assert decode.mean_decode_context(128, 128) == 192
    b1 = decode.bandwidth_bound_tokens_per_s(h100, weights, kv_seq, 1)
    assert b1 == pytest.approx(3.35e12 / (weights + 25_165_824))  # ~223 tokens/s
    assert b1 == pytest.approx(222.82, abs=0.01)
    # batch 32 shares one weight read: 32 x bandwidth / (weights + 32 x kv)
    b32 = decode.bandwidth_bound_tokens_per_s(h100, weights, kv_seq, 32)
    assert b32 == pytest.approx(32 * 3.35e12 / (weights + 32 * 25_165_824))
    assert 28 * b1 < b32 < 32 * b1
    assert decode.bandwidth_bound_tokens_per_s(None, weights, kv_seq, 1) is None


def test_prefill_compute_bound():
    params = {"body": 6_979_321_856, "head": 525_336_576}
    flops = prefill.prefill_flops(params, batch=8, prompt_tokens=512)
    assert flops == 2 * 6_979_321_856 * 8 * 512 + 2 * 525_336_576 * 8
    peak = gpu_specs.peak_flops(gpu_specs.lookup("NVIDIA H100 80GB HBM3"), torch.bfloat16)
    assert prefill.compute_bound_s(flops, peak) == pytest.approx(flops / 989.5e12)  # ~58 ms
    assert prefill.compute_bound_s(flops, None) is None


def test_random_prompt_fixed_seed_no_specials():
    a, mask = common.random_prompt(4, 64, 50, [0, 1, 2], seed=0, device="cpu")
    b, _ = common.random_prompt(4, 64, 50, [0, 1, 2], seed=0, device="cpu")
    c, _ = common.random_prompt(4, 64, 50, [0, 1, 2], seed=1, device="cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 64) and mask.sum() == 4 * 64
    assert not torch.isin(a, torch.tensor([0, 1, 2])).any() and a.max() < 50


# ---- on the tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.build(tmp_path_factory.mktemp("tiny") / "tiny")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cpu")
    return model, AutoTokenizer.from_pretrained(str(path))


def test_forced_generation_length_even_when_eos_is_emitted(tiny_model):
    model, _ = tiny_model
    n = 8
    ids, mask = common.random_prompt(1, 8, 2048, [0, 1, 2], seed=0, device="cpu")
    saved = copy.deepcopy(model.generation_config)
    try:
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        emitted = int(free[0, ids.shape[1] + 2])  # the token greedy decoding emits at step 3
        model.generation_config.eos_token_id = emitted
        stopped = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        assert stopped.shape[1] - ids.shape[1] <= 3  # a plain generate stops at that EOS
        for path in ("eager", "static"):  # static runs uncompiled on CPU: same forcing, other cache
            r = _generate.generate_timed(model, ids, mask, n, path, "cpu", pad_token_id=0)
            assert r["output_ids"].shape[1] - ids.shape[1] == n
            assert len(r["steps_s"]) == n and r["steps_s"][0] == 0.0
            assert all(b >= a for a, b in zip(r["steps_s"], r["steps_s"][1:]))
    finally:
        model.generation_config = saved


def _quick(**kw):
    base = dict(batch_sizes=[1, 2], prompt_tokens=[8, 16], decode_prompt_tokens=8, new_tokens=4,
                decode_paths=["eager", "static"], warmup_runs=1, min_repeats=2, max_repeats=3, min_duration_s=0.0)
    base.update(kw)
    return yaml_defaults("bench", "default", **base)  # conf/bench/default.yaml's values for the rest


def test_measure_on_cpu(tiny_model, monkeypatch):
    model, tok = tiny_model
    # Pretend the CPU is an H100 for the bounds, so that their arithmetic runs end to end here.
    monkeypatch.setattr(gpu_specs, "for_device",
                        lambda *a, **k: gpu_specs.lookup("NVIDIA H100 80GB HBM3"))
    fp = memory.weight_footprint(model)
    pm = memory.PhaseMemory("cpu")
    out = latency.measure(model, tok, _quick(), "cpu", pm, fp["weight_bytes_read_per_token"], model.config)
    json.dumps(out)  # result.json material
    assert out["device"] == "cpu" and out["timer"] == "perf_counter"
    assert out["torch_settings"] == {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                                     "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                                     "inductor_max_autotune": False, "inductor_coordinate_descent_tuning": False,
                                     "inductor_force_fuse_int_mm_with_mul": False}
    assert [(p["batch_size"], p["prompt_tokens"]) for p in out["prefill"]] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    for p in out["prefill"]:
        assert 2 <= p["ttft_ms"]["n"] <= 3 and p["ttft_ms"]["unit"] == "ms"
        assert p["tokens_per_s"] == pytest.approx(p["batch_size"] * p["prompt_tokens"] / (p["ttft_ms"]["p50"] / 1e3))
        assert p["compute_bound_fraction"] == pytest.approx(p["flops"] / 989.5e12 / (p["ttft_ms"]["p50"] / 1e3))
    assert [(d["decode_path"], d["batch_size"]) for d in out["decode"]] == [("eager", 1), ("eager", 2)]
    kv_token = memory.kv_cache_bytes(model.config, 1, 1, 2)
    for d in out["decode"]:
        runs = d["tokens_per_s"]["n"]
        assert 2 <= runs <= 3 and d["per_token_ms"]["n"] == runs * 3  # 4 tokens: 3 step intervals per run
        bound = d["batch_size"] * 3.35e12 / (fp["weight_bytes_read_per_token"] + d["batch_size"] * kv_token * (8 + 2))
        assert d["bandwidth_bound_tokens_per_s"] == pytest.approx(bound)
        assert d["energy_j_per_token"] is None  # no NVML on CPU
        assert d["new_tokens"] == 4 and d["prompt_tokens"] == 8
        assert d["precision"]["target_ci_pct"] == 1.0 and d["precision"]["repeats"] == runs
        assert d["measured_bandwidth_bound_fraction"] is None  # no copy bandwidth measured on CPU
    assert out["unsupported"] == [{"decode_path": "static", "batch_size": None,
                                   "reason": "transformers compiles the static-cache decode only on cuda/xpu, not on cpu"}]
    assert any(w.startswith("decode static: not measured") for w in out["warnings"])
    assert out["one_time"]["first_call_s"] > 0 and out["one_time"]["compile_s"] is None
    assert out["gpu_state"] == {}
    assert 0 < out["host_cpu"]["busy_pct"] <= 100 and 0 <= out["host_cpu"]["steal_pct"] <= out["host_cpu"]["busy_pct"]
    assert {"batch_size": 2, "seq_len_tokens": 16, "bytes": memory.kv_cache_bytes(model.config, 2, 16, 2)} in out["kv_cache_bytes_analytic"]
    assert set(pm.summary()["rss_bytes_at_phase_end"]) == {"prefill", "decode"}


def test_cv_warnings_are_returned(tiny_model):
    model, tok = tiny_model
    out = latency.measure(model, tok, _quick(batch_sizes=[1], prompt_tokens=[8], decode_paths=["eager"],
                                             cv_warn_threshold=0.0), "cpu", None, 1, model.config)
    # threshold 0: any spread warns, once per figure (prefill and decode tokens/s)
    assert len([w for w in out["warnings"] if "CV" in w]) == 2


@pytest.mark.gpu
def test_measure_on_gpu(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.build(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cuda")
    tok = AutoTokenizer.from_pretrained(str(path))
    fp = memory.weight_footprint(model)
    pm = memory.PhaseMemory("cuda")
    out = latency.measure(model, tok, _quick(), "cuda", pm, fp["weight_bytes_read_per_token"], model.config)
    assert out["timer"] == "cuda_events"
    assert {d["decode_path"] for d in out["decode"]} | {u["decode_path"] for u in out["unsupported"]} == {"eager", "static"}
    for d in out["decode"]:
        assert d["tokens_per_s"]["p50"] > 0
        if out["gpu_spec"] is not None:
            assert d["bandwidth_bound_fraction"] > 0
    assert out["gpu_state"]["start"]["gpus"][0]["index"] == 0
    assert pm.summary()["peak_allocated_bytes"]["decode"] > 0


def test_every_figure_warms_up_until_steady(tiny_model, monkeypatch):
    """A first call carries one-time costs and compiled paths keep speeding up for a few calls after their compile
    (H100: calls 3-5 ran ~7 % slow), so prefill and the compiled paths may warm up to bench.max_warmup_runs calls
    while runs still get faster by more than warmup_steady_pct; eager decode, which has no such transient, warms
    up bench.warmup_runs; never fewer than bench.warmup_runs. Both are recorded."""
    model, tok = tiny_model
    monkeypatch.setattr(_generate, "static_unsupported_reason", lambda *a, **k: None)  # run it uncompiled on CPU
    seen = []
    real_repeat = timing.repeat

    def spy(run_once, **loop):
        seen.append((loop["warmup_runs"], loop["max_warmup_runs"]))
        return real_repeat(run_once, **loop)

    monkeypatch.setattr(timing, "repeat", spy)
    cfg = _quick(batch_sizes=[1], prompt_tokens=[8], warmup_runs=1, max_warmup_runs=3)
    out = latency.measure(model, tok, cfg, "cpu", None, 1, model.config)
    # one prefill loop, then eager and static decode at batch 1: eager has no transient after its first call
    assert seen == [(1, 3), (1, 1), (1, 3)]
    assert [d["decode_path"] for d in out["decode"]] == ["eager", "static"]
    assert out["settings"]["warmup_runs"] == 1 and out["settings"]["max_warmup_runs"] == 3
    seen.clear()
    out = latency.measure(model, tok, _quick(batch_sizes=[1], prompt_tokens=[8], warmup_runs=2, max_warmup_runs=0),
                          "cpu", None, 1, model.config)
    assert seen == [(2, 2), (2, 2), (2, 2)] and out["settings"]["max_warmup_runs"] == 2


# ---- repeat until precise ------------------------------------------------------------------------------


def test_repeat_stops_once_the_median_is_precise():
    clock, log = FakeClock(), []
    r = timing.repeat(workload(clock, 0.1, log), warmup_runs=0, min_repeats=6, max_repeats=100, min_duration_s=0,
                      target_ci_pct=1.0, max_time_s=100, value_of=lambda _: 50.0, clock=clock)
    assert r["n"] == 6 and r["stopped_by"] == "precision" and r["ci_half_width_pct"] == 0.0


def test_repeat_runs_on_until_the_ci_is_narrow_enough():
    # values spread by +-10 % at first, then settle at 100: the order-statistic CI shrinks as the steady
    # runs outnumber the early ones, and the loop stops as soon as it is within +-1 %
    clock, log = FakeClock(), []
    noisy = [90.0, 110.0, 95.0, 105.0, 92.0, 108.0]
    values = lambda i: noisy[i - 1] if i <= len(noisy) else 100.0
    r = timing.repeat(workload(clock, 0.1, log), warmup_runs=0, min_repeats=6, max_repeats=100, min_duration_s=0,
                      target_ci_pct=1.0, max_time_s=100, value_of=values, clock=clock)
    assert r["stopped_by"] == "precision" and 6 < r["n"] < 100
    from qbench.measure.stats import median_ci

    got = sorted(values(i) for i in r["results"])
    assert median_ci(got)["half_width_pct"] <= 1.0
    fewer = sorted(values(i) for i in r["results"][:-1])
    assert median_ci(fewer)["half_width_pct"] > 1.0  # it did not run one more than needed


def test_repeat_flags_a_figure_that_hits_its_time_cap():
    clock, log = FakeClock(), []
    r = timing.repeat(workload(clock, 0.5, log), warmup_runs=1, min_repeats=6, max_repeats=100, min_duration_s=0,
                      target_ci_pct=1.0, max_time_s=5.0, value_of=lambda i: 100.0 + 20 * (i % 2), clock=clock)
    assert r["stopped_by"] == "time_cap" and r["n"] == 10 and r["timed_s"] == pytest.approx(5.0)
    assert r["ci_half_width_pct"] > 1.0
    warning = common._precision_warning("decode eager bs=1", r, Settings.from_bench(
        _quick(target_ci_pct=1.0, max_time_per_figure_s=5.0)))
    assert "target ±1 % not reached" in warning and "after 10 runs" in warning


def test_a_cap_of_zero_runs_the_minimums_only_and_is_no_cap_hit():
    """max_time_s=0 asks for min_repeats (and min_duration_s) only: a noisy figure stops there as "min_repeats",
    not flagged as capped; one that is already precise there still says "precision"."""
    clock, log = FakeClock(), []
    noisy = timing.repeat(workload(clock, 0.5, log), warmup_runs=1, min_repeats=6, max_repeats=100, min_duration_s=0,
                          target_ci_pct=1.0, max_time_s=0.0, value_of=lambda i: 100.0 + 20 * (i % 2), clock=clock)
    assert noisy["stopped_by"] == "min_repeats" and noisy["n"] == 6 and noisy["ci_half_width_pct"] > 1.0
    steady = timing.repeat(workload(clock, 0.5, []), warmup_runs=1, min_repeats=6, max_repeats=100, min_duration_s=0,
                           target_ci_pct=1.0, max_time_s=0.0, value_of=lambda i: 100.0, clock=clock)
    assert steady["stopped_by"] == "precision" and steady["n"] == 6
    long_minimum = timing.repeat(workload(clock, 0.5, []), warmup_runs=0, min_repeats=6, max_repeats=100,
                                 min_duration_s=4.0, target_ci_pct=1.0, max_time_s=0.0,
                                 value_of=lambda i: 100.0 + 20 * (i % 2), clock=clock)
    assert long_minimum["n"] == 8  # min_duration_s still holds
    s = Settings.from_bench(_quick(target_ci_pct=1.0))
    assert common._precision_warning("decode eager bs=1", noisy, s, "eager") is None


def test_eager_decode_has_its_own_time_cap():
    """bench.max_time_per_eager_figure_s caps eager decode's figures (default 0: the minimum runs); prefill and
    the compiled paths keep bench.max_time_per_figure_s; null gives eager that cap too. Warnings and the slow-
    figure line name the key that applied."""
    s = Settings.from_bench(_quick(max_time_per_figure_s=10.0))
    assert yaml_defaults("bench").max_time_per_eager_figure_s == 0.0
    assert s.loop("eager")["max_time_s"] == 0.0 and s.loop("eager")["max_warmup_runs"] == s.warmup_runs
    for path in (None, "static", "graph"):
        assert s.loop(path)["max_time_s"] == 10.0 and s.loop(path)["max_warmup_runs"] == s.max_warmup_runs
    same = Settings.from_bench(_quick(max_time_per_figure_s=10.0, max_time_per_eager_figure_s=None))
    assert same.loop("eager")["max_time_s"] == 10.0
    five = Settings.from_bench(_quick(target_ci_pct=1.0, max_time_per_eager_figure_s=5.0))
    clock = FakeClock()
    r = timing.repeat(workload(clock, 0.5, []), value_of=lambda i: 100.0 + 20 * (i % 2), clock=clock,
                      **{**five.loop("eager"), "min_repeats": 6, "max_repeats": 100})
    assert r["stopped_by"] == "time_cap" and r["timed_s"] == pytest.approx(5.0)
    assert common._precision_warning("decode eager bs=1", r, five, "eager").endswith(
        "within bench.max_time_per_eager_figure_s=5")
    assert "bench.max_time_per_figure_s=10" in common._precision_warning("decode static bs=1", r, five, "static")


def test_a_negative_eager_cap_is_refused_by_name():
    from qbench.config import validate_bench
    from qbench.errors import ConfigError

    with pytest.raises(ConfigError, match="bench.max_time_per_eager_figure_s: -1"):
        validate_bench(_quick(max_time_per_eager_figure_s=-1.0))
    validate_bench(_quick(max_time_per_eager_figure_s=0.0))
    validate_bench(_quick(max_time_per_eager_figure_s=None))


def test_warm_up_runs_while_runs_get_faster():
    clock = FakeClock()
    durations = iter([10.0, 5.0, 3.0, 2.95, 2.0, 2.0])

    def run():
        clock.t += next(durations)

    secs = timing.warm_up(run, min_runs=1, max_runs=6, steady_pct=5.0, clock=clock)
    assert secs == pytest.approx([10.0, 5.0, 3.0, 2.95])  # 2.95 is not 5 % faster than 3.0: steady, although 2.0 would follow
    log = []
    # a noisy path (slower, faster, slower) stops at the first run that is not faster
    noisy = iter([4.0, 2.0, 2.5, 1.0])

    def jitter():
        clock.t += next(noisy)
        log.append(1)

    assert len(timing.warm_up(jitter, min_runs=1, max_runs=6, steady_pct=2.0, clock=clock)) == 3
    assert len(timing.warm_up(workload(clock, 0.1, []), min_runs=2, max_runs=3, steady_pct=0.0, clock=clock)) == 2


def test_warm_up_past_its_minimum_stays_within_the_time_cap():
    """A slow figure that keeps speeding up stops warming up once the warm-ups after the first (which holds the
    compile) have taken the figure's time cap; the minimum runs regardless."""
    clock = FakeClock()

    def slowing_down(durations):
        it = iter(durations)

        def run():
            seconds = next(it)
            clock.t += seconds
            return seconds
        return run

    runs = [40.0, 10.0, 9.0, 8.0, 7.0, 6.0]
    assert len(timing.warm_up(slowing_down(runs), min_runs=1, max_runs=6, steady_pct=5.0, clock=clock)) == 6
    capped = timing.warm_up(slowing_down(runs), min_runs=1, max_runs=6, steady_pct=5.0, max_time_s=15.0, clock=clock)
    assert capped == pytest.approx([40.0, 10.0, 9.0])  # 10 + 9 s past the first reach the 15 s cap
    assert len(timing.warm_up(slowing_down(runs), min_runs=4, max_runs=6, steady_pct=5.0, max_time_s=1.0,
                              clock=clock)) == 4
    seen = []
    r = timing.repeat(slowing_down(runs + [5.0] * 3), warmup_runs=1, max_warmup_runs=6, min_repeats=3, max_repeats=3,
                      min_duration_s=0.0, target_ci_pct=1.0, max_time_s=15.0, steady_pct=5.0,
                      after_warmup=seen.append, clock=clock)
    assert seen == [pytest.approx([40.0, 10.0, 9.0])] and r["warmup_s"] == seen[0] and r["n"] == 3


def test_a_figure_whose_minimum_runs_are_slow_says_so_before_it_runs_them(caplog):
    """The time cap cannot cut a figure below bench.min_repeats: when those runs will take SLOW_FIGURE_S or more
    at the last warm-up's pace, the cell's log says so before they start (a cell stopped then still explains)."""
    s = Settings.from_bench(_quick(min_repeats=6, max_time_per_figure_s=3.0))
    say = common._say_if_slow("decode static bs=32", s)
    with caplog.at_level(logging.INFO, logger="qbench.latency"):
        say([12.0, 4.0])  # 6 x 4 s = 24 s: no line
        assert not caplog.records
        say([30.0, 19.8])
    (rec,) = caplog.records
    assert rec.getMessage() == ("decode static bs=32: one run takes 19.8 s: the 6 timed runs of bench.min_repeats "
                                "will take about 119 s, past bench.max_time_per_figure_s=3")


# ---- the graph path ------------------------------------------------------------------------------------


def _compile_on_cpu():
    from transformers import CompileConfig

    cc = CompileConfig(backend="eager", mode=None)  # dynamo traces, nothing is code-generated: seconds
    cc._compile_all_devices = True  # transformers' own switch for compiling generate on CPU (its tests use it)
    return cc


def test_graph_path_replays_generates_own_compiled_step(tiny_model):
    """graph calls the compiled step that static generate uses, with its recorded arguments, on its cache: the
    tokens it produces are the ones generate produced, and the cache ends where generate left it."""
    model, _ = tiny_model
    cc = _compile_on_cpu()
    ids, mask = common.random_prompt(2, 8, 2048, [0, 1, 2], seed=0, device="cpu")
    n = 6
    ref = _generate.generate_timed(model, ids, mask, n, "static", "cpu", 0, cc)["output_ids"][:, ids.shape[1]:]
    calls = graph.record_decode_steps(model, ids, mask, n, "cpu", 0, cc)
    assert len(calls) == n - 1
    for _ in range(2):  # replays repeat: the cache is rewound each time
        r = graph.graph_decode_timed(model, calls, "cpu")
        assert len(r["steps_s"]) == n and r["steps_s"][0] == 0.0
        assert torch.equal(torch.cat(r["tokens"], dim=1), ref[:, 1:])
    assert int(graph._cache_of(calls).get_seq_length()) == ids.shape[1] + n - 1


@pytest.mark.slow  # real Inductor compiles on CPU
def test_measure_graph_path_on_cpu(tiny_model):
    model, tok = tiny_model
    cfg = _quick(batch_sizes=[1, 2], prompt_tokens=[8], decode_paths=["graph", "eager", "static"],
                 target_ci_pct=50.0, max_time_per_figure_s=5.0)
    out = latency.measure(model, tok, cfg, "cpu", None, 1, model.config, compile_config=_compile_on_cpu())
    # batch-major, and static before graph whatever the YAML's order: graph replays what static compiled
    assert [(d["decode_path"], d["batch_size"]) for d in out["decode"]] == [
        ("eager", 1), ("static", 1), ("graph", 1), ("eager", 2), ("static", 2), ("graph", 2)]
    for d in out["decode"]:
        assert d["tokens_per_s"]["median_ci"]["low"] <= d["tokens_per_s"]["p50"] <= d["tokens_per_s"]["median_ci"]["high"]
        assert d["precision"]["stopped_by"] in ("precision", "time_cap", "max_repeats")
        assert d["precision"]["repeats"] == d["tokens_per_s"]["n"]
    assert out["unsupported"] == []
    assert out["copy_bandwidth"] is None  # measured on GPUs only


@pytest.mark.slow  # real Inductor compiles on CPU
def test_compiled_paths_run_at_compiled_batch_sizes_only(tiny_model, caplog):
    """bench.compiled_batch_sizes=[1]: static and graph at batch 1 only (one compile), eager at every batch size;
    the skipped figures are named in the log and are not recorded as unsupported."""
    model, tok = tiny_model
    cfg = _quick(batch_sizes=[1, 2], prompt_tokens=[8], decode_paths=["eager", "static", "graph"],
                 compiled_batch_sizes=[1], target_ci_pct=50.0, max_time_per_figure_s=5.0)
    with caplog.at_level(logging.INFO, logger="qbench.latency"):
        out = latency.measure(model, tok, cfg, "cpu", None, 1, model.config, compile_config=_compile_on_cpu())
    assert [(d["decode_path"], d["batch_size"]) for d in out["decode"]] == [
        ("eager", 1), ("static", 1), ("graph", 1), ("eager", 2)]
    assert out["unsupported"] == [] and out["settings"]["compiled_batch_sizes"] == [1]
    assert "decode static bs=2: not run (bench.compiled_batch_sizes=[1])" in caplog.text
    assert Settings.from_bench(_quick(batch_sizes=[1, 2])).compiled_batch_sizes == [1, 2]  # null: all


def test_compiled_batch_sizes_are_checked_by_name():
    from qbench.config import validate_bench
    from qbench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"bench.compiled_batch_sizes: \[8\] not in bench.batch_sizes \[1, 2\]"):
        validate_bench(_quick(batch_sizes=[1, 2], compiled_batch_sizes=[1, 8]))
    with pytest.raises(ConfigError, match=r"bench.compiled_batch_sizes: \[\] names no batch size"):
        validate_bench(_quick(compiled_batch_sizes=[]))
    validate_bench(_quick(batch_sizes=[1, 2], compiled_batch_sizes=[2]))
    validate_bench(_quick(compiled_batch_sizes=None))


def test_decode_paths_are_checked():
    with pytest.raises(ValueError, match="bench.decode_paths: 'eagre' is not one of eager, static, graph"):
        Settings.from_bench(_quick(decode_paths=["eagre"]))


# ---- the compile deadline ------------------------------------------------------------------------------


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_deadline_stops_a_block_that_runs_past_it():
    t0 = time.monotonic()
    with pytest.raises(timing.DeadlineExceeded, match="too slow"), timing.deadline(0.2, "too slow"):
        _spin(5.0)
    assert time.monotonic() - t0 < 2.0
    with timing.deadline(5.0, "never"):  # a block that ends in time is left alone, and so is what follows
        _spin(0.05)
    _spin(0.3)
    with timing.deadline(None, "no limit"):
        _spin(0.3)


def test_deadline_raises_again_when_a_library_swallows_the_first():
    """Dynamo and Inductor catch and wrap errors raised while they compile; one that carried on would otherwise
    compile for as long as it liked."""
    swallowed = []
    with pytest.raises(timing.DeadlineExceeded), timing.deadline(0.1, "late"):
        try:
            _spin(5.0)
        except timing.DeadlineExceeded:
            swallowed.append(True)
        _spin(5.0)  # the library's own carrying on
    assert swallowed == [True]


def test_deadline_puts_back_an_outer_alarm():
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        with timing.deadline(5.0, "inner"):
            _spin(0.1)
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0.2  # the outer alarm runs on, less the block's time
        _spin(1.0)
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_deadline_is_a_no_op_off_the_main_thread():
    import threading

    done = []
    th = threading.Thread(target=lambda: (timing.deadline(0.01, "x").__enter__(), _spin(0.1), done.append(True)))
    th.start()
    th.join()
    assert done == [True]


@pytest.mark.slow  # every static call spins 3 s of fake compile, and the test makes many
def test_a_compile_past_max_compile_s_marks_static_and_graph_unsupported(tiny_model, monkeypatch):
    """A compile that runs past bench.max_compile_s ends that path (and graph, which replays static's compiled
    step) as unsupported with the reason; eager is measured at every batch size all the same. The deadline
    covers only the first call at a batch size: later calls may take their time."""
    model, tok = tiny_model
    monkeypatch.setattr(_generate, "static_unsupported_reason", lambda *a, **k: None)
    real = _generate.generate_timed

    def slow_first_compile(model, ids, mask, new_tokens, path, *a, **k):
        if path == "static":
            _spin(3.0)  # the 'compile'
        return real(model, ids, mask, new_tokens, path, *a, **k)

    monkeypatch.setattr(_generate, "generate_timed", slow_first_compile)
    cfg = _quick(batch_sizes=[1, 2], prompt_tokens=[8], decode_paths=["eager", "static", "graph"], max_compile_s=0.5)
    out = latency.measure(model, tok, cfg, "cpu", None, 1, model.config)
    assert [(d["decode_path"], d["batch_size"]) for d in out["decode"]] == [("eager", 1), ("eager", 2)]
    by_path = {u["decode_path"]: u for u in out["unsupported"]}
    assert by_path["static"] == {"decode_path": "static", "batch_size": 1, "reason":
                                 "DeadlineExceeded: torch.compile of the static decode step at batch 1 ran past "
                                 "bench.max_compile_s=0.5 s"}
    assert by_path["graph"]["batch_size"] == 1
    assert by_path["graph"]["reason"].startswith("needs the static path's compiled step (DeadlineExceeded: ")
    assert out["settings"]["max_compile_s"] == 0.5
    # the same slow first call within the limit, or with no limit, is measured
    for limit in (10.0, None):
        out = latency.measure(model, tok, _quick(batch_sizes=[1], prompt_tokens=[8], decode_paths=["static"],
                                                 max_compile_s=limit, min_repeats=1, max_repeats=1),
                              "cpu", None, 1, model.config)
        assert [d["decode_path"] for d in out["decode"]] == ["static"] and out["unsupported"] == []


def test_max_compile_s_bounds_the_cells_compiles_together(tiny_model, monkeypatch, caplog):
    """Each batch size's first static call 'compiles' for 1.5 s, within a 2.5 s limit on its own, but not twice:
    batch 1 is measured, the second compile (batch 2) is stopped by what is left, and the reason says how much the
    earlier compiles spent. A per-call limit would have let every batch size compile for the whole limit."""
    model, tok = tiny_model
    monkeypatch.setattr(_generate, "static_unsupported_reason", lambda *a, **k: None)
    real = _generate.generate_timed
    compiled_at = set()

    def slow_compile_per_batch(model, ids, mask, new_tokens, path, *a, **k):
        if path == "static" and ids.shape[0] not in compiled_at:
            compiled_at.add(ids.shape[0])
            _spin(1.5)  # the batch size's 'compile'
        return real(model, ids, mask, new_tokens, path, *a, **k)

    monkeypatch.setattr(_generate, "generate_timed", slow_compile_per_batch)
    cfg = _quick(batch_sizes=[1, 2], prompt_tokens=[8], decode_paths=["eager", "static"], max_compile_s=2.5)
    caplog.set_level(logging.INFO, logger="qbench.latency")
    out = latency.measure(model, tok, cfg, "cpu", None, 1, model.config)
    assert [(d["decode_path"], d["batch_size"]) for d in out["decode"]] == [("eager", 1), ("static", 1), ("eager", 2)]
    (static,) = out["unsupported"]
    assert static["decode_path"] == "static" and static["batch_size"] == 2
    assert re.fullmatch(r"DeadlineExceeded: torch\.compile of the static decode step at batch 2 ran past "
                        r"bench\.max_compile_s=2\.5 s \((\d+) s of it spent on the cell's earlier compiles\)",
                        static["reason"]), static["reason"]
    assert out["one_time"]["decode"][1]["first_call_s"] >= 1.5
    # the cell's log says when each compiled path starts with what is left, and which one was stopped
    lines = [r.getMessage() for r in caplog.records if r.name == "qbench.latency"]
    assert "decode static bs=1: starting (compiles may take 2.5 s more of bench.max_compile_s)" in lines
    assert any(re.fullmatch(r"decode static bs=2: starting \(compiles may take [01]\.\d s more of bench\.max_compile_s\)", x)
               for x in lines), lines
    assert f"decode static bs=2: not measured ({static['reason']})" in lines
    # no limit: both batch sizes compile and are measured
    compiled_at.clear()
    out = latency.measure(model, tok, _quick(batch_sizes=[1, 2], prompt_tokens=[8], decode_paths=["static"],
                                             max_compile_s=None), "cpu", None, 1, model.config)
    assert [d["batch_size"] for d in out["decode"]] == [1, 2] and out["unsupported"] == []


def test_a_long_first_call_logs_a_heartbeat_and_its_time(caplog):
    """While a compiled path's first call runs, a line every every_s says it is still going (a compile stuck where
    the alarm cannot reach would show in the cell's log); its duration is added to what the compiles spent."""
    caplog.set_level(logging.INFO, logger="qbench.latency")
    spent = [1.0]
    with decode._timed_block(contextlib.nullcontext(), spent, "decode static bs=8", every_s=0.2):
        _spin(0.7)
    time.sleep(0.3)  # nothing more once the block has ended
    beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert 2 <= len(beats) <= 4, beats
    assert all(re.fullmatch(r"decode static bs=8: first call \(compile\) still running after \d+ s", b) for b in beats)
    assert len(spent) == 2 and 0.7 <= spent[1] < 2.0


def test_a_deadline_wrapped_by_the_compiler_is_named_as_itself():
    try:
        try:
            raise timing.DeadlineExceeded("torch.compile of the static decode step at batch 8 ran past x")
        except timing.DeadlineExceeded as exc:
            raise RuntimeError("BackendCompilerFailed: backend='inductor' raised: ...") from exc
    except RuntimeError as wrapped:
        assert decode._reason_of(wrapped) == \
            "DeadlineExceeded: torch.compile of the static decode step at batch 8 ran past x"
    assert decode._reason_of(ValueError("boom\nmore")) == "ValueError: boom"


def test_a_real_inductor_compile_past_max_compile_s_is_stopped(tiny_model, tmp_path, monkeypatch):
    """The deadline against torch.compile itself (Inductor on the CPU, transformers' own switch to compile there):
    the alarm gets through Dynamo and Inductor, static and graph are recorded unsupported, and eager at the next
    batch size still runs in the same process. (A compile within the limit: test_measure_graph_path_on_cpu.)"""
    from transformers import CompileConfig

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold: a cached graph loads fast
    model, tok = tiny_model
    cc = CompileConfig()  # inductor, as generate compiles on a GPU
    cc._compile_all_devices = True
    cfg = _quick(batch_sizes=[1, 2], prompt_tokens=[8], decode_paths=["eager", "static", "graph"], max_compile_s=1.0)
    t0 = time.monotonic()
    out = latency.measure(model, tok, cfg, "cpu", None, 1, model.config, compile_config=cc)
    assert time.monotonic() - t0 < 60
    assert [(d["decode_path"], d["batch_size"]) for d in out["decode"]] == [("eager", 1), ("eager", 2)]
    reasons = {u["decode_path"]: u["reason"] for u in out["unsupported"]}
    assert reasons["static"].startswith("DeadlineExceeded: torch.compile of the static decode step at batch 1")
    assert reasons["graph"].startswith("needs the static path's compiled step (DeadlineExceeded")
