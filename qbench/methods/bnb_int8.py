"""bitsandbytes LLM.int8 (Dettmers et al. 2022): 8-bit weights with a per-row scale; activation columns whose
magnitude exceeds ``llm_int8_threshold`` run in 16-bit. transformers keeps lm_head unquantized."""
from __future__ import annotations

from typing import Any

# transformers' bitsandbytes integration converts every nn.Linear but the output embedding and tied weights,
# vision tower and projector of a multimodal model included (qbench.measure.memory.quantized_linears_of)
QUANTIZED_LINEARS = "transformers_bnb"


def validate(method_cfg: Any) -> None:
    from qbench.config import ConfigError

    if method_cfg.bits not in (None, 8):
        raise ConfigError(f"method.bits: {method_cfg.bits} is not supported by bnb_int8 (8)")
    if method_cfg.llm_int8_threshold < 0:
        raise ConfigError(f"method.llm_int8_threshold: {method_cfg.llm_int8_threshold} is negative")


def load(source: Any, method_cfg: Any, device_map: Any):
    import torch
    from transformers import BitsAndBytesConfig

    from qbench.models import from_pretrained

    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(method_cfg.llm_int8_threshold))
    model = from_pretrained(
        source, device_map=device_map, dtype=getattr(torch, method_cfg.dtype), quantization_config=quant
    )
    return model, {"quantization_config": quant.to_dict(), "quantize_s": None, "quantized_at_load": True}


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    # int8 weight + one fp32 scale (SCB) per output row
    return out_features * in_features + 4 * out_features
