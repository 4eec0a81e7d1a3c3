"""Weight footprint: measured from every tensor the model holds vs exact arithmetic on the architecture."""
from __future__ import annotations

import importlib
import math
import types

import pytest
import torch

from qbench.load import tiny
from qbench.measure import memory

LLAMA_3_1_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
}

BF16 = types.SimpleNamespace(dtype="bfloat16", bnb_4bit_use_double_quant=True)


def fake(fn):
    return types.SimpleNamespace(linear_weight_bytes=fn)


def bf16_bytes(out_f, in_f, cfg):
    return out_f * in_f * 2


def nf4_dq_bytes(out_f, in_f, cfg):
    """bitsandbytes 0.50 Linear4bit, NF4 + double quant, as stored per layer: packed 4-bit weights, uint8
    absmax per 64-block, fp32 absmax per 256 blocks, fp32 offset, 256-entry fp32 nested code, 16-entry fp32
    NF4 code."""
    n = out_f * in_f
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 + 16 * 4


def int8_bytes(out_f, in_f, cfg):
    return out_f * in_f + 4 * out_f  # int8 weight + fp32 SCB per output row


# ---- analytic arithmetic -------------------------------------------------------------------------------


def test_analytic_tiny_bf16():
    a = memory.analytic_weights(tiny.TINY_LLAMA, fake(bf16_bytes), BF16)
    # per layer: q 128x128, k 64x128, v 64x128, o 128x128, gate/up 256x128, down 128x256, 2 norms of 128
    per_layer_linear = 128 * 128 * 2 + 64 * 128 * 2 + 256 * 128 * 3
    assert a["params_quantized"] == 2 * per_layer_linear == 294912
    assert a["params_total"] == 2 * 2048 * 128 + 2 * (per_layer_linear + 256) + 128 == 819840
    assert a["weight_bytes_analytic"] == 2 * a["params_total"]
    assert a["bits_per_weight_quantized"] == 16.0
    assert a["quantized_linears"] == 14


def test_analytic_llama_3_1_8b_nf4_double_quant():
    a = memory.analytic_weights(LLAMA_3_1_8B, fake(nf4_dq_bytes), BF16)
    assert a["params_total"] == 8_030_261_248
    # 32 layers x (q 4096^2 + k,v 1024x4096 + o 4096^2 + 3 x 14336x4096)
    assert a["params_quantized"] == 6_979_321_856
    # every linear's size divides by 64*256: n/2 + n/64 + 4n/(64*256), plus 1,092 constant bytes x 224 linears
    assert a["weight_bytes_analytic_quantized_linears"] == 3_489_660_928 + 109_051_904 + 1_703_936 + 224 * 1092
    # embeddings + lm_head (2 x 128256 x 4096) + norms (65 x 4096) at 2 bytes
    assert a["weight_bytes_analytic_other"] == 2 * (2 * 525_336_576 + 65 * 4096)
    assert a["weight_bytes_analytic"] == 3_600_661_376 + 2_101_878_784
    assert a["bits_per_weight_quantized"] == pytest.approx(4.127, abs=0.001)


def test_analytic_llama_3_1_8b_int8_and_tied():
    a = memory.analytic_weights(LLAMA_3_1_8B, fake(int8_bytes), BF16)
    rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 * 2 + 4096)  # output rows of all quantized linears
    assert a["weight_bytes_analytic_quantized_linears"] == 6_979_321_856 + 4 * rows
    assert a["bits_per_weight_quantized"] == pytest.approx(8 + 32 * rows / 6_979_321_856)
    tied = memory.analytic_weights({**LLAMA_3_1_8B, "tie_word_embeddings": True}, fake(bf16_bytes), BF16)
    assert tied["params_total"] == 8_030_261_248 - 128256 * 4096  # lm_head is the embedding, counted once


def test_kv_cache_bytes():
    # Llama-3.1-8B: 2 (K,V) x 32 layers x 8 kv heads x 128 dims x 2 bytes = 128 KiB per token
    assert memory.kv_cache_bytes(LLAMA_3_1_8B, 1, 1, 2) == 131072
    assert memory.kv_cache_bytes(LLAMA_3_1_8B, 8, 256, 2) == 131072 * 8 * 256
    assert memory.kv_cache_bytes(tiny.TINY_LLAMA, 2, 10, 4) == 2 * 2 * 2 * 10 * 2 * 32 * 4


# ---- measured ------------------------------------------------------------------------------------------


def test_footprint_dedupes_tied_and_views_and_finds_quant_state():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied: one storage
            self.register_buffer("row", self.emb.weight.data[0])  # a view inside the same bytes
            self.register_buffer("inv_freq", torch.ones(3), persistent=False)
            self.q = torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
            self.q.quant_state = types.SimpleNamespace(
                absmax=torch.zeros(2, dtype=torch.uint8),
                state2=types.SimpleNamespace(absmax=torch.zeros(1), code=torch.zeros(256)),
            )

    # where the state lives is the method's to say (qbench.methods: STATE_ATTRS); a method that says nothing
    # gets only parameters and buffers counted
    method = types.SimpleNamespace(STATE_ATTRS={"parameter": ("quant_state",)})
    assert memory.weight_footprint(Toy())["weight_bytes_measured"] == 10 * 4 * 4 + 8
    fp = memory.weight_footprint(Toy(), method)
    assert fp["weight_bytes_measured"] == 10 * 4 * 4 + 8 + 2 + 4 + 256 * 4
    assert fp["weight_bytes_by_kind"]["quant_state"] == 2 + 4 + 1024
    assert fp["nonpersistent_buffer_bytes"] == 12
    assert fp["weight_bytes_get_memory_footprint"] is None  # not a transformers model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("tiny") / "tiny")


def _load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cpu", **kw)


def _real(kind):
    try:
        return importlib.import_module(f"qbench.methods.{kind}")
    except ImportError:
        return None


def test_measured_equals_analytic_bf16(tiny_dir):
    model = _load(tiny_dir)
    fp = memory.weight_footprint(model)
    a = memory.analytic_weights(model.config, fake(bf16_bytes), BF16)
    assert fp["weight_bytes_measured"] == a["weight_bytes_analytic"] == 1_639_680  # ratio exactly 1
    assert fp["weight_bytes_by_kind"]["quant_state"] == 0
    assert fp["nonpersistent_buffer_bytes"] == 128  # rotary inv_freq + original_inv_freq, fp32, apart
    assert fp["weight_bytes_get_memory_footprint"] == 1_639_680 + 128  # transformers counts buffers too
    assert fp["weight_bytes_read_per_token"] == 1_639_680 - 2048 * 128 * 2  # untied embedding table not read
    dtype_mod = _real("dtype")
    if dtype_mod is not None:
        real = memory.analytic_weights(model.config, dtype_mod, BF16)
        assert real["weight_bytes_analytic"] == fp["weight_bytes_measured"]


def test_measured_vs_analytic_bnb_nf4(tiny_dir):
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = _load(tiny_dir, quantization_config=q)
    fp = memory.weight_footprint(model, _real("bnb_4bit"))
    a = memory.analytic_weights(model.config, fake(nf4_dq_bytes), BF16)
    assert fp["weight_bytes_measured"] == a["weight_bytes_analytic"]  # every quant-state byte found
    assert fp["weight_bytes_by_kind"]["quant_state"] > 0
    # transformers' figure misses the quant states: exactly what the walk adds
    assert fp["weight_bytes_get_memory_footprint"] < fp["weight_bytes_measured"]
    real = _real("bnb_4bit")
    if real is not None:
        ra = memory.analytic_weights(model.config, real, BF16)
        assert fp["weight_bytes_measured"] / ra["weight_bytes_analytic"] == pytest.approx(1.0, abs=0.01)


def test_measured_vs_analytic_bnb_int8(tiny_dir):
    from transformers import BitsAndBytesConfig

    model = _load(tiny_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    fp = memory.weight_footprint(model, _real("bnb_int8"))
    a = memory.analytic_weights(model.config, fake(int8_bytes), BF16)
    assert fp["weight_bytes_measured"] == a["weight_bytes_analytic"]  # CB is the weight itself: counted once
    real = _real("bnb_int8")
    if real is not None:
        ra = memory.analytic_weights(model.config, real, BF16)
        assert fp["weight_bytes_measured"] / ra["weight_bytes_analytic"] == pytest.approx(1.0, abs=0.01)


def test_tensor_subclass_counted_by_its_inner_tensors():
    """A wrapper tensor subclass (torchao's quantized weights) holds no storage of its own: its inner tensors
    (__tensor_flatten__) are what the footprint counts, whatever method produced it."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8Tensor, PerRow

    lin = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    lin.weight = torch.nn.Parameter(Int8Tensor.from_hp(lin.weight.detach(), granularity=PerRow()), requires_grad=False)
    fp = memory.weight_footprint(lin)
    assert fp["weight_bytes_measured"] == 32 * 64 + 32 * 4 + 32  # int8 qdata, fp32 scale and int8 zero per row
    assert fp["tensors_counted"] == 3


def test_phase_memory_cpu():
    pm = memory.PhaseMemory("cpu")
    with pm.phase("load"):
        blob = bytearray(8 * 1024 * 1024)
    d = pm.summary()
    del blob
    assert d["peak_allocated_bytes"] is None and d["peak_reserved_bytes"] is None and d["nvml_used_bytes"] is None
    assert d["rss_peak_bytes"] >= d["rss_bytes_at_phase_end"]["load"] > 8 * 1024 * 1024


@pytest.mark.gpu
def test_phase_memory_cuda():
    pm = memory.PhaseMemory("cuda")
    with pm.phase("prefill"):
        x = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        del x
    d = pm.summary()
    assert d["peak_allocated_bytes"]["prefill"] >= 64 * 1024 * 1024
    assert d["peak_reserved_bytes"]["prefill"] >= d["peak_allocated_bytes"]["prefill"]
