"""bitsandbytes 4-bit (QLoRA, Dettmers et al. 2023): NF4 or FP4 weights in blocks of 64 with an absmax scale.

Every default is explicit here because transformers' own are a trap: ``load_in_4bit=True`` alone gives FP4
with float32 compute and no double quantization. qbench's ``bnb_nf4`` is NF4 + double quant + bf16 compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from qbench.config import MethodBase

EXTRA = "bnb"
LIBRARIES = ("bitsandbytes",)
# transformers' bitsandbytes integration converts every nn.Linear but the output embedding and tied weights,
# vision tower and projector of a multimodal model included (qbench.measure.memory.quantized_linears_of)
QUANTIZED_LINEARS = "transformers"
# Params4bit.quant_state: absmax, code, offset, nested state2.{absmax, code}
STATE_ATTRS = {"parameter": ("quant_state",), "module": ("quant_state",)}


@dataclass
class Config(MethodBase):
    """bnb_4bit's keys; each value comes from its YAML (conf/method/bnb_nf4.yaml): none is declared here."""

    bits: Optional[int] = MISSING  # bits per quantized weight (4 only)
    bnb_4bit_quant_type: str = MISSING  # nf4 | fp4 (transformers' default is fp4: we never rely on it)
    bnb_4bit_use_double_quant: bool = MISSING  # quantize the absmax scales too (4.127 instead of 4.5 bits/weight)
    bnb_4bit_compute_dtype: str = MISSING  # dtype of the matmul (transformers' default is float32)


def is_quantized_module(module: Any) -> bool:
    return type(module._parameters.get("weight")).__name__ == "Params4bit"

BLOCK = 64  # weights per absmax scale (bitsandbytes' fixed 4-bit block size)
NESTED_BLOCK = 256  # absmax values per fp32 scale when double quantization is on


def validate(method_cfg: Any) -> None:
    from qbench.config import DTYPES
    from qbench.errors import ConfigError

    if method_cfg.bits not in (None, 4):
        raise ConfigError(f"method.bits: {method_cfg.bits} is not supported by bnb_4bit (4)")
    if method_cfg.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"method.bnb_4bit_quant_type: '{method_cfg.bnb_4bit_quant_type}' is not nf4 or fp4")
    if method_cfg.bnb_4bit_compute_dtype not in DTYPES:
        raise ConfigError(
            f"method.bnb_4bit_compute_dtype: '{method_cfg.bnb_4bit_compute_dtype}' is not one of {', '.join(DTYPES)}"
        )


def load(source: Any, method_cfg: Any, device_map: Any):
    import torch
    from transformers import BitsAndBytesConfig

    from qbench.load.models import from_pretrained

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bool(method_cfg.bnb_4bit_use_double_quant),
        bnb_4bit_compute_dtype=getattr(torch, method_cfg.bnb_4bit_compute_dtype),
    )
    model = from_pretrained(
        source, device_map=device_map, dtype=getattr(torch, method_cfg.dtype), quantization_config=quant
    )
    return model, {"quantization_config": quant.to_dict(), "quantize_s": None, "quantized_at_load": True}


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """Bytes one Linear4bit holds: packed weights plus its quant state, as bitsandbytes 0.50 stores it per
    layer (read off ``weight.quant_state``): absmax per block, the 16-entry NF4/FP4 code table (fp32) and, with
    double quantization, uint8 absmax + fp32 absmax per 256 blocks + an fp32 offset + the 256-entry fp32 map."""
    n = out_features * in_features
    blocks = -(-n // BLOCK)
    packed = -(-n // 2)  # two 4-bit values per byte
    code = 16 * 4
    if not method_cfg.bnb_4bit_use_double_quant:
        return packed + 4 * blocks + code  # one fp32 absmax per block: 4.5 bits/weight
    nested = 4 * -(-blocks // NESTED_BLOCK) + 4 + 256 * 4
    return packed + blocks + code + nested  # 4.127 bits/weight on large layers
