"""GGUF k-quants through llama.cpp (qbench/methods/gguf.py): keys and formulas without llama.cpp, then whole cells on
the tiny model and on SmolLM2-135M (make install builds llama-cpp-python and unpacks llama.cpp's converter; make
weights fetches SmolLM2), measured beside the torch cells on the same quality windows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qbench.errors import ConfigError
from qbench.load import weights

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf" / "method"
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")


def _cfg(**over):
    from qbench import methods
    from qbench.config import yaml_defaults

    methods.register_schemas()  # yaml_defaults finds the method's schema in Hydra's ConfigStore
    cfg = yaml_defaults("method", "gguf_q4_k_m")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# fast: the shipped YAMLs, validation, the analytic bytes


def test_five_yamls_one_kind():
    from qbench import methods
    from qbench.config import yaml_defaults

    methods.register_schemas()
    seen = {}
    for q in QUANT_TYPES:
        cfg = yaml_defaults("method", f"gguf_{q.lower()}")
        methods.get(cfg.kind).validate(cfg)
        seen[cfg.name] = cfg.quant_type
    assert seen == {f"gguf_{q.lower()}": q for q in QUANT_TYPES}


@pytest.mark.parametrize("over,message", [
    ({"quant_type": "Q4_K_S"}, "method.quant_type: 'Q4_K_S' is not one of Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M"),
    ({"dtype": "bfloat16"}, "method.dtype: 'bfloat16'"),
    ({"n_threads": 0}, "method.n_threads: 0"),
    ({"n_ctx_tokens": 0}, "method.n_ctx_tokens: 0"),
    ({"n_gpu_layers": -2}, "method.n_gpu_layers: -2"),
])
def test_validate_names_the_key(over, message):
    from qbench import methods

    with pytest.raises(ConfigError) as e:
        methods.get("gguf").validate(_cfg(**over))
    assert message in str(e.value)


@pytest.mark.parametrize("requested,on_gpu,supported,layers,note", [
    (None, False, True, 0, None),                        # a CPU cell never offloads
    (None, True, True, -1, None),                        # a GPU cell with a CUDA build: every layer on the GPU
    (12, True, True, 12, None),                          # the first 12 layers
    (0, True, True, 0, "method.n_gpu_layers=0"),         # asked for the CPU on a GPU cell: said so
    (None, True, False, 0, "no GPU offload (built without CUDA"),  # a CPU build on a GPU node: said so
    (12, True, False, 0, "no GPU offload (built without CUDA"),
])
def test_gpu_layers_follow_the_device_and_the_build(requested, on_gpu, supported, layers, note):
    from qbench import methods

    n, said = methods.get("gguf").gpu_layers(_cfg(n_gpu_layers=requested), on_gpu, supported)
    assert n == layers
    assert (said is None) if note is None else (note in said)


def test_linear_bytes_follow_llamacpp_fallback_for_rows_not_a_multiple_of_256():
    from qbench import methods

    g = methods.get("gguf")
    # Q8_0: 34 bytes per 32 weights, any row length
    assert g.linear_weight_bytes(576, 576, _cfg(quant_type="Q8_0")) == 576 * 576 * 8.5 / 8
    # Q4_K: 144 bytes per 256 weights; a 576-long row gets Q5_0 (22 bytes per 32 = 5.5 bits)
    assert g.linear_weight_bytes(576, 1536, _cfg(quant_type="Q4_K_M")) == 576 * 1536 * 4.5 / 8
    assert g.linear_weight_bytes(1536, 576, _cfg(quant_type="Q4_K_M")) == 1536 * 576 * 5.5 / 8
    assert g.linear_weight_bytes(1536, 576, _cfg(quant_type="Q6_K")) == 1536 * 576 * 8.5 / 8


def test_missing_converter_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    from qbench.methods import _llamacpp as lc

    monkeypatch.delenv(lc.SOURCES_ENV, raising=False)
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lc, "CHECKOUT_CACHE", tmp_path / "checkout-cache")
    with pytest.raises(ConfigError) as e:
        lc.check_sources(lc.sources_dir(tmp_path))
    assert "python -m qbench.methods._llamacpp setup" in str(e.value) and "\n" not in str(e.value)


def test_converter_in_the_default_cache_serves_a_sweep_with_its_own_cache_dir(tmp_path, monkeypatch):
    """make install unpacks the converter into the default cache; run.cache_dir=elsewhere still finds it."""
    from qbench.methods import _llamacpp as lc

    monkeypatch.delenv(lc.SOURCES_ENV, raising=False)
    default = tmp_path / "default"
    (default / f"llama.cpp-{lc.LLAMA_CPP_PYTHON}").mkdir(parents=True)
    (default / f"llama.cpp-{lc.LLAMA_CPP_PYTHON}" / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("QBENCH_CACHE", str(default))
    assert lc.sources_dir(tmp_path / "own") == default / f"llama.cpp-{lc.LLAMA_CPP_PYTHON}"


# ---------------------------------------------------------------------------------------------------------
# llama.cpp: whole cells through the CLI

SOURCES = Path(os.environ.get("QBENCH_LLAMACPP_SRC") or weights.default_dest().parent / "llama.cpp-0.3.36")
FAST = ["bench=quick", "bench.batch_sizes=[1,2]", "bench.new_tokens=4", "bench.min_repeats=2", "bench.max_repeats=2",
        "bench.warmup_runs=0", "bench.prompt_tokens=[16]", "bench.decode_prompt_tokens=8", "bench.device=cpu",
        "eval=quality", "eval.quality.max_windows=2", "run.baseline_method=fp32"]


@pytest.fixture(scope="module")
def llama_cpp():
    pytest.importorskip("llama_cpp", reason="the gguf extra (make install builds it)")
    if not (SOURCES / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"{SOURCES} has no converter: `python -m qbench.methods._llamacpp setup` (make install runs it)")
    return SOURCES


def _sweep(args, tmp_path, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QBENCH_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),  # a node's site too
           "QBENCH_LLAMACPP_SRC": str(SOURCES)}
    proc = subprocess.run([sys.executable, "-m", "qbench", "-m", *args, f"run.runs_dir={tmp_path / 'runs'}",
                           "run.sweep=g"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs" / "g").glob("*/result.json")}


def test_tiny_gguf_cells_measure_like_torch_cells(llama_cpp, tmp_path):
    res = _sweep(["model=tiny", "method=fp32,gguf_q8_0,gguf_q4_k_m", *FAST], tmp_path, tmp_path / "cache")
    for name in ("gguf_q8_0", "gguf_q4_k_m"):
        r = res[f"tiny__{name}"]
        assert r["status"] == "ok", r.get("error")
        info, mem, lat = r["method_info"], r["metrics"]["memory"], r["metrics"]["latency"]
        # the tiny tokenizer's pre-tokenizer is unknown to llama.cpp: converted as gpt-2, and said so
        assert info["tokenizer_pre_fallback"] == "gpt-2" and info["llama_cpp_python"] == "0.3.36"
        assert mem["weight_bytes_measured"] > 0 and 0.9 < mem["weight_measured_over_analytic"] < 1.1
        assert lat["runtime"] == "llama.cpp" and lat["decode"][0]["tokens_per_s"]["mean"] > 0
        assert lat["prefill"][0]["prompt_tokens"] == 16
        assert [u["batch_size"] for u in lat["unsupported"]] == [2]
        budget = r["timings"]["budget"]  # llama.cpp's loop runs in its worker and is still measuring time
        assert budget["latency_timed_s"] > 0 and budget["latency_warmup_s"] < 1e-3  # bench.warmup_runs=0
        cmp = r["metrics"]["quality"]["comparison"]
        assert cmp is not None and cmp["kl_divergence"]["n_windows"] == 2, "compared with fp32 on its windows"
    # hidden 128: every k-quant row falls back to a legacy type; Q8_0 has no fallback to take
    assert res["tiny__gguf_q4_k_m"]["metrics"]["memory"]["fallback_tensors"] > 0
    assert set(res["tiny__gguf_q8_0"]["metrics"]["memory"]["tensor_types"]) == {"Q8_0"}
    kl = {m: res[f"tiny__{m}"]["metrics"]["quality"]["comparison"]["kl_divergence"]["mean"]
          for m in ("gguf_q8_0", "gguf_q4_k_m")}
    assert 0 <= kl["gguf_q8_0"] < kl["gguf_q4_k_m"], kl


def _offloads() -> bool:
    """Whether this llama-cpp-python can put layers on a GPU (a CUDA build), asked as a gguf cell asks: its worker's
    runtime_facts, in llama.cpp's own process (a CUDA build must not load a model beside numpy)."""
    from qbench.methods._llamacpp_worker import LlamaWorker

    worker = LlamaWorker()
    try:
        return bool(worker.call("runtime_facts")["gpu_offload_supported"])
    finally:
        worker.close()


@pytest.mark.gpu
def test_tiny_gguf_cells_on_a_gpu_run_every_layer_there(llama_cpp, tmp_path):
    """A GPU cell with a CUDA build of llama.cpp (docs/gguf.md) offloads every layer: its latency loop and its quality
    log-probs come from the GPU, in the worker started by a cell that holds torch and a CUDA context."""
    if not _offloads():
        pytest.skip("llama-cpp-python here is a CPU build (docs/gguf.md: CUDA build); "
                    "test_gpu_layers_follow_the_device_and_the_build covers what such a cell says")
    gpu = [a for a in FAST if a != "bench.device=cpu"] + ["bench.device=cuda"]
    res = _sweep(["model=tiny", "method=fp32,gguf_q8_0,gguf_q4_k_m", *gpu], tmp_path, tmp_path / "cache")
    assert res["tiny__fp32"]["status"] == "ok" and str(res["tiny__fp32"]["device"]).startswith("cuda")
    for name in ("gguf_q8_0", "gguf_q4_k_m"):
        r = res[f"tiny__{name}"]
        assert r["status"] == "ok", r.get("error")
        info, lat = r["method_info"], r["metrics"]["latency"]
        assert info["gpu_offload_supported"] and info["runs_on"] == "cuda" and info["n_gpu_layers"] == -1
        assert "gpu_note" not in info, info["gpu_note"]
        assert "CUDA" in info["llama_cpp_features"], info["llama_cpp_features"]
        assert lat["device"] == "cuda" and lat["n_gpu_layers"] == -1
        assert lat["decode"][0]["tokens_per_s"]["mean"] > 0 and lat["prefill"][0]["ttft_ms"]["p50"] > 0
        assert r["metrics"]["quality"]["comparison"]["kl_divergence"]["n_windows"] == 2
    kl = {m: res[f"tiny__{m}"]["metrics"]["quality"]["comparison"]["kl_divergence"]["mean"]
          for m in ("gguf_q8_0", "gguf_q4_k_m")}
    assert 0 <= kl["gguf_q8_0"] < kl["gguf_q4_k_m"], kl


def test_real_model_q8_is_closer_to_fp32_than_q4_k_m(llama_cpp, tmp_path):
    gguf = weights.default_dest() / weights.file_name("smollm2")
    if not gguf.exists():
        pytest.fail(f"{gguf} is missing: `make weights` fetches it (make test does)")
    cache = weights.default_dest().parent  # shared with make demo: dequantized, converted and quantized once
    res = _sweep(["model=smollm2_135m", f"model.source={gguf}", "method=fp32,gguf_q8_0,gguf_q4_k_m", *FAST],
                 tmp_path, cache)
    q8, q4 = (res[f"smollm2_135m__{m}"] for m in ("gguf_q8_0", "gguf_q4_k_m"))
    assert q4["method_info"]["requantized_from"] == "MOSTLY_Q4_1", "the source GGUF was already quantized"
    c8, c4 = q8["metrics"]["quality"]["comparison"], q4["metrics"]["quality"]["comparison"]
    assert c8["kl_divergence"]["mean"] < c4["kl_divergence"]["mean"] < 0.5
    assert c8["top1_agreement_pct"]["mean"] > 90
    bpw = q4["metrics"]["memory"]["bits_per_weight_quantized"]
    assert 4.5 < bpw < 6.0, bpw  # Q4_K, Q6_K and (rows of 576) Q5_0 fallbacks
    assert q4["metrics"]["memory"]["weight_bytes_measured"] < q8["metrics"]["memory"]["weight_bytes_measured"]
