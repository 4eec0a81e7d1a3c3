"""A real model with no network: SmolLM2-135M-Instruct from its GGUF (``make weights``), and quality numbers that
mean something on it: against fp32, bf16 loses least, then LLM.int8, then NF4, by KL divergence and by top-1
agreement; the approximations of the stored distributions stay within 1 % of the exact KL on it too."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from qbench import methods
from qbench.evaluate import quality
from qbench.evaluate.perplexity import load_perplexity_text
from qbench.load import models, weights
from qbench.run.cli import conf_dir
from qbench.run.preflight import register_configs

register_configs()
GGUF = weights.default_dest() / weights.file_name("smollm2")
QCFG = OmegaConf.create({"ctx_tokens": 256, "max_windows": 4, "batch_size": 4, "coverage": 0.999, "max_kept": 4096})


def compose_cell(method: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=smollm2_135m", f"method={method}",
                                                       f"model.source={GGUF}"])
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def source():
    if not GGUF.exists():
        pytest.fail(f"{GGUF} is missing: `make weights` fetches it (make test does)")
    # the default cache, shared with make demo: the GGUF is dequantized once per machine
    return models.resolve(compose_cell("fp32").model, weights.default_dest().parent)


@pytest.fixture(scope="module")
def runs(source, tmp_path_factory):
    """Each method's quality section against fp32, plus the full log-probs of fp32 and bnb_nf4 for exact KL."""
    tok = models.load_tokenizer(source)
    text = load_perplexity_text("builtin:tiny_text")
    tmp = tmp_path_factory.mktemp("real")
    meta = {"source": "builtin:tiny_text", "model_config_hash": "smollm2"}
    out, full = {}, {}
    for name in ("fp32", "bf16", "bnb_int8", "bnb_nf4"):
        cfg = compose_cell(name)
        model, _ = methods.get(cfg.method.kind).load(source, cfg.method, {"": "cpu"})
        model.eval()
        with torch.no_grad():  # bitsandbytes on CPU un-nests NF4's absmax at the first forward: exact and stored
            model(torch.tensor([[1, 2, 3]]))  # distributions must come from the same numerics
        out[name] = quality.run(model, tok, QCFG, text=text, cell_dir=tmp / name,
                                baseline_file=None if name == "fp32" else tmp / "fp32" / quality.LOGPROBS_FILE,
                                meta=meta)
        if name in ("fp32", "bnb_nf4"):
            windows = quality.load(tmp / name / quality.LOGPROBS_FILE)["tokens"]
            full[name] = torch.cat([lp for _, lp in quality.window_logprobs(model, windows, 4)]).double()
        del model
    return out, full, tmp


def test_gguf_source_is_real_weights_converted_once(source):
    assert not source.random_weights
    assert source.info["gguf_sha256"] == weights.PACKAGED["smollm2"].sha256
    assert source.info["gguf_architecture"] == "llama"
    again = models.resolve(compose_cell("bf16").model, weights.default_dest().parent)
    assert again.path == source.path and again.info["materialised_cached"] is True
    config = models.config_dict(compose_cell("fp32").model)
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)


def test_a_converted_gguf_is_not_parsed_again(tmp_path, monkeypatch):
    """The conversion records the GGUF's architecture; a cell that finds the folder reads it from there instead
    of parsing the GGUF's header again (2.1 s of every SmolLM2 cell before)."""
    if not GGUF.exists():
        pytest.fail(f"{GGUF} is missing: `make weights` fetches it (make test does)")
    first = models.resolve(compose_cell("fp32").model, tmp_path)
    assert (Path(first.path) / models.GGUF_ARCHITECTURE_FILE).read_text().strip() == "llama"

    def no_parse(path):
        raise AssertionError("the GGUF header was parsed again")

    monkeypatch.setattr(models, "gguf_architecture", no_parse)
    again = models.resolve(compose_cell("bf16").model, tmp_path)
    assert again.info["materialised_cached"] is True and again.info["gguf_architecture"] == "llama"


@pytest.mark.slow  # the runs fixture loads SmolLM2-135M four ways and runs quality on each
def test_fp32_perplexity_is_plausible_for_a_135m_model(runs):
    out, _, _ = runs
    ppl = out["fp32"]["ppl"]
    # MMLU/GSM8K prose with a 128-token context at least: a 135M instruct model lands in single digits; a
    # broken load (random or misread weights) gives thousands (~vocab size)
    assert math.isfinite(ppl) and 2.0 < ppl < 30.0, ppl


@pytest.mark.slow  # the runs fixture loads SmolLM2-135M four ways and runs quality on each
def test_quality_orders_the_methods(runs):
    out, _, _ = runs
    kl = {m: out[m]["comparison"]["kl_divergence"]["mean"] for m in ("bf16", "bnb_int8", "bnb_nf4")}
    top1 = {m: out[m]["comparison"]["top1_agreement_pct"]["mean"] for m in ("bf16", "bnb_int8", "bnb_nf4")}
    assert 0 < kl["bf16"] < kl["bnb_int8"] < kl["bnb_nf4"], kl
    assert 100 >= top1["bf16"] > top1["bnb_int8"] > top1["bnb_nf4"], top1
    ratio = {m: out[m]["comparison"]["ppl_ratio"]["mean"] for m in ("bf16", "bnb_nf4")}
    assert abs(ratio["bf16"] - 1) < abs(ratio["bnb_nf4"] - 1), ratio
    for m in ("bf16", "bnb_int8", "bnb_nf4"):
        c = out[m]["comparison"]
        assert c["kl_divergence"]["ci95_low"] < c["kl_divergence"]["mean"] < c["kl_divergence"]["ci95_high"]
        assert out[m]["comparison_source"] == "live"


@pytest.mark.slow  # the runs fixture loads SmolLM2-135M four ways and runs quality on each
def test_stored_distributions_are_within_one_percent_of_exact_kl_on_the_real_model(runs):
    out, full, tmp = runs
    p, q = full["fp32"], full["bnb_nf4"]
    exact = float((p.exp() * (p - q)).sum(-1).mean())
    live = out["bnb_nf4"]["comparison"]["kl_divergence"]["mean"]
    later = quality.compare_later(tmp / "bnb_nf4", tmp / "fp32")["kl_divergence"]["mean"]
    assert abs(live - exact) / exact <= 0.01, (live, exact)
    assert abs(later - exact) / exact <= 0.01, (later, exact)
    assert np.isclose(out["bnb_nf4"]["comparison"]["ppl_baseline"], out["fp32"]["ppl"], rtol=1e-6)
