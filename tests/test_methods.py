"""Each method of the pipeline issue loads the tiny model on CPU, runs a forward pass, and its measured weight
footprint matches the analytic one and is smaller than fp32's where it should be."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qbench import methods, models
from qbench.cli import conf_dir
from qbench.config import ConfigError, register_configs
from qbench.measure import memory

register_configs()


def method_cfg(name: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny", f"method={name}"])
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    cfg = method_cfg("fp32")
    return models.resolve(cfg.model, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def loaded(tiny_source):
    out = {}
    for name in ("fp32", "fp16", "bf16", "bnb_int8", "bnb_nf4"):
        cfg = method_cfg(name)
        module = methods.get(cfg.method.kind)
        model, info = module.load(tiny_source, cfg.method, {"": "cpu"})
        out[name] = (cfg, module, model, info)
    return out


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "bnb_int8", "bnb_nf4"])
def test_method_runs_a_forward_pass(loaded, tiny_source, name):
    cfg, module, model, info = loaded[name]
    tok = models.load_tokenizer(tiny_source)
    ids = tok(["Natalia sold clips to 48 of her friends"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize(
    "name,max_ratio_to_fp32",
    [("fp32", 1.0), ("fp16", 0.5), ("bf16", 0.5), ("bnb_int8", 0.5), ("bnb_nf4", 0.5)],
)
def test_footprint_measured_equals_analytic_and_shrinks(loaded, name, max_ratio_to_fp32):
    cfg, module, model, info = loaded[name]
    measured = memory.weight_footprint(model)["weight_bytes_measured"]
    analytic = memory.analytic_weights(model.config, module, cfg.method)["weight_bytes_analytic"]
    assert measured == pytest.approx(analytic, rel=0.01), f"{name}: measured {measured} vs analytic {analytic}"
    fp32 = memory.weight_footprint(loaded["fp32"][2])["weight_bytes_measured"]
    assert measured <= fp32 * max_ratio_to_fp32 + 1


def test_quantized_linears_really_are_bitsandbytes(loaded, tiny_source):
    import bitsandbytes as bnb

    int8 = loaded["bnb_int8"][2]
    # A fresh load: on CPU, bitsandbytes 0.50 repacks a Linear4bit for its CPU kernel at the first forward pass
    # and turns the double-quantized absmax back into one bf16 scale per block (quant_state.nested becomes
    # False), so the shared fixture, which the forward-pass tests have run, no longer shows the stored format.
    cfg = method_cfg("bnb_nf4")
    nf4, _ = methods.get(cfg.method.kind).load(tiny_source, cfg.method, {"": "cpu"})
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in int8.modules())
    layers4 = [m for m in nf4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers4
    qs = layers4[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested, "NF4 with double quantization"
    assert layers4[0].compute_dtype == torch.bfloat16


def test_nf4_bits_per_weight_is_4_127():
    cfg = method_cfg("bnb_nf4").method
    bytes_ = methods.get("bnb_4bit").linear_weight_bytes(4096, 4096, cfg)
    assert bytes_ * 8 / (4096 * 4096) == pytest.approx(4.127, abs=0.001)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: awq, bnb_4bit, bnb_int8, dtype, gptq"):
        methods.get("nope")
