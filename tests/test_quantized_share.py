"""What a method really quantized, and whether the memory model covers what the architecture holds: tiny MoE
and multimodal models built here from transformers' own config classes (nothing from the Hub)."""
from __future__ import annotations

import pytest
import torch

from qbench import methods
from qbench.load import models
from qbench.measure import memory
from tests.test_methods import method_cfg


def _save(model_cls_config, path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_cls_config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return models.Source(str(path), None, False, True, str(path))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=512)
    return _save(config, tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from transformers import Gemma3Config

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, vocab_size=512, sliding_window=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    return _save(config, tmp_path_factory.mktemp("gemma3"))


def _memory(source, name):
    cfg = method_cfg(name).method
    method = methods.get(cfg.kind)
    model, _ = method.load(source, cfg, {"": "cpu"})
    mem = {**memory.weight_footprint(model, method), **memory.analytic_weights(model.config, method, cfg),
           **memory.quantized_share(model, method)}
    mem["weight_measured_over_analytic"] = mem["weight_bytes_measured"] / mem["weight_bytes_analytic"]
    return mem, memory.memory_warnings(mem, memory.method_quantizes(method, cfg))


@pytest.mark.parametrize("name", ["bnb_nf4", "bnb_int8"])
def test_moe_experts_left_unquantized_are_counted_and_warned(mixtral, name):
    mem, warnings = _memory(mixtral, name)
    # experts are 3-D parameters, not nn.Linear: bitsandbytes leaves them alone
    assert mem["decoder_unquantized_fraction"] > 0.5
    assert any("experts" in n for n in mem["decoder_unquantized_largest"])
    assert 0 < mem["quantized_params_fraction"] < 0.2
    assert 0 < mem["quantized_bytes_fraction"] < 0.2
    assert mem["params_quantized_measured"] + mem["params_unquantized_measured"] == mem["params_total"]
    assert any("stay unquantized" in w and "experts" in w for w in warnings), warnings


def test_dense_model_fully_quantized_gives_no_warning(tmp_path):
    from transformers import LlamaConfig

    source = _save(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=512), tmp_path)
    mem, warnings = _memory(source, "bnb_nf4")
    assert mem["decoder_unquantized_fraction"] == 0.0
    assert warnings == []
    bf16, warnings = _memory(source, "bf16")  # a method that quantizes nothing is not warned about it
    assert bf16["quantized_params_fraction"] == 0.0 and warnings == []


@pytest.mark.parametrize("name", ["bnb_nf4", "bnb_int8", "bf16"])
def test_multimodal_analytic_covers_vision_tower_and_projector(gemma3, name):
    mem, warnings = _memory(gemma3, name)
    assert 0.99 <= mem["weight_measured_over_analytic"] <= 1.01, mem["weight_measured_over_analytic"]
    assert not any("measured / analytic" in w for w in warnings)


def test_ratio_outside_band_is_a_warning():
    warnings = memory.memory_warnings({"weight_measured_over_analytic": 0.93}, quantizes=True)
    assert len(warnings) == 1 and "0.930" in warnings[0]
    assert memory.memory_warnings({"weight_measured_over_analytic": 1.005}, quantizes=True) == []
