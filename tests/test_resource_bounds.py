"""Sizes against the model's limits, at preflight (issue 29, item 5): memory a cell needs at its largest moment
against what its device has, and every sequence against the model's context. One line naming the key and the
figures; nothing measured, nothing written."""
from __future__ import annotations

import re

import pytest

from qbench.run import cli
from qbench.run import preflight as pf
from tests.test_preflight import assert_one_line_error, run
from tests.test_preflight_inputs import preflight_error

GIB = 2**30


def with_memory(monkeypatch, gib, where="the host has {:.2f} GiB available (psutil)"):
    monkeypatch.setattr(pf, "device_memory", lambda cfg: (int(gib * GIB), where))


def test_a_batch_far_past_memory_fails_preflight_with_the_figures(tmp_path, monkeypatch):
    with_memory(monkeypatch, 16)
    line = preflight_error(tmp_path, "model=tiny", "bench.device=cpu", "bench.batch_sizes=[1,100000]")
    m = re.match(r"bench\.batch_sizes: batch 100000, prefill of 512 tokens needs at least ([\d.]+) GiB \(weights "
                 r"[\d.]+ GiB \+ KV cache ([\d.]+) GiB \+ activations [\d.]+ GiB\) but the host has 16\.00 GiB "
                 r"available \(psutil\); lower bench\.batch_sizes", line)
    assert m, line
    # tiny: 2 layers x 2 KV heads x 32 dims x K and V x 2 bytes (bf16) = 512 B a token, x 100000 x 512 tokens
    assert float(m.group(2)) == pytest.approx(512 * 100000 * 512 / GIB, abs=0.01)


def test_the_same_sweep_passes_where_the_memory_is(tmp_path, monkeypatch):
    with_memory(monkeypatch, 16)
    line = preflight_error(tmp_path, "model=tiny", "bench.device=cpu", "bench.batch_sizes=[100000]")
    with_memory(monkeypatch, 4096)  # a host with 4 TiB: the estimate is a bound, not a guess to be safe by
    cli.preflight(["model=tiny", "bench.device=cpu", "bench.batch_sizes=[100000]", f"run.runs_dir={tmp_path / 'r'}"])
    assert line


def test_a_gpu_cell_is_held_to_its_cards_total(tmp_path, monkeypatch):
    with_memory(monkeypatch, 141, "model.num_gpus=1 GPU(s) hold {:.2f} GiB in total (NVML)")
    line = preflight_error(tmp_path, "model=tiny", "bench.batch_sizes=[400000]")
    assert "but model.num_gpus=1 GPU(s) hold 141.00 GiB in total (NVML)" in line, line


def test_quality_batch_past_memory_names_its_key(tmp_path, monkeypatch):
    with_memory(monkeypatch, 8)
    line = preflight_error(tmp_path, "model=tiny", "bench.enabled=false", "eval.quality.enabled=true",
                           "eval.quality.batch_size=4096")
    assert line.startswith("eval.quality.batch_size: 4096 windows of 512 tokens needs at least"), line


def test_the_real_host_refuses_the_issue_case_on_the_command_line(tmp_path):
    """The issue's command, end to end: exit 2, one line, nothing under runs/ (this host has far below 85 GiB)."""
    proc = run(["model=tiny", "bench.device=cpu", "bench.batch_sizes=[100000]"], tmp_path)
    assert_one_line_error(proc, tmp_path, "bench.batch_sizes: batch 100000", "GiB available (psutil)")


@pytest.mark.parametrize("overrides,needle", [
    (["bench.prompt_tokens=[512,8192]"], "bench.prompt_tokens: 8192 tokens exceed the context of model 'tiny' (4096"),
    (["bench.decode_prompt_tokens=4000", "bench.new_tokens=128"],
     "bench.decode_prompt_tokens + bench.new_tokens: 4128 tokens exceed"),
    (["eval.quality.enabled=true", "eval.quality.ctx_tokens=5000"], "eval.quality.ctx_tokens: 5000 tokens exceed"),
    (["eval.perplexity.enabled=true", "eval.perplexity.seq_len_tokens=4097"],
     "eval.perplexity.seq_len_tokens: 4097 tokens exceed"),
    (["method=gptq", "method.calibration.seq_len_tokens=8000"], "method.calibration.seq_len_tokens: 8000 tokens"),
    (["eval.enabled=true", "eval.tasks=[mmlu]", "eval.data_dir=builtin:fixtures", "eval.max_length_tokens=9999"],
     "eval.max_length_tokens: 9999 tokens exceed"),
])
def test_sequences_longer_than_the_context_fail_preflight(tmp_path, overrides, needle):
    line = preflight_error(tmp_path, "model=tiny", *overrides)
    assert needle in line, line


def test_the_context_of_a_gguf_model_is_read_from_its_header(tmp_path):
    from pathlib import Path

    gguf = Path(__import__("os").environ.get("QBENCH_CACHE", ".cache/qbench")) / "weights" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip("SmolLM2 GGUF not fetched (make weights)")
    line = preflight_error(tmp_path, "model=smollm2_135m", f"model.source={gguf}", "bench.prompt_tokens=[9000]")
    assert "bench.prompt_tokens: 9000 tokens exceed the context of model 'smollm2_135m' (8192 tokens" in line, line


def test_memory_needs_are_lower_bounds_from_the_config():
    from omegaconf import OmegaConf

    from qbench.load import tiny

    cfg = OmegaConf.create({
        "method": {"dtype": "float32"},
        "bench": {"enabled": True, "batch_sizes": [2], "prompt_tokens": [10], "decode_prompt_tokens": 6,
                  "new_tokens": 4},
        "eval": {"quality": {"enabled": False}},
    })
    needs = pf.memory_needs(cfg, dict(tiny.TINY_LLAMA))
    per_token_kv = 2 * 2 * 2 * 32 * 4  # K and V, 2 layers, 2 KV heads, 32 dims, fp32
    assert [(n[1], n[2], n[3]) for n in needs] == [
        ("batch 2, prefill of 10 tokens", 2 * 10 * per_token_kv, 2 * 10 * (128 + 2 * 256) * 4),
        ("batch 2, decode to 10 tokens", 2 * 10 * per_token_kv, 2 * 6 * (128 + 2 * 256) * 4),  # prefill of 6
    ]
