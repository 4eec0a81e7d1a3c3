"""bitsandbytes LLM.int8 (Dettmers et al. 2022): 8-bit weights with a per-row scale; activation columns whose
magnitude exceeds ``llm_int8_threshold`` run in 16-bit. transformers keeps lm_head unquantized."""
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
# Int8Params.CB / .SCB on the weight; Linear8bitLt.state (MatmulLtState: CB, SCB, ...) on the layer. CB is the
# weight's own data: the walk counts each byte once.
STATE_ATTRS = {"parameter": ("CB", "SCB"), "module": ("state", "SCB", "CB")}
# The int8 matmul's peak, not the 16-bit one, bounds compute (qbench.measure.latency)
COMPUTE_DTYPE = "int8"


@dataclass
class Config(MethodBase):
    """bnb_int8's keys; each value comes from its YAML (conf/method/bnb_int8.yaml): none is declared here."""

    bits: Optional[int] = MISSING  # bits per quantized weight (8 only)
    llm_int8_threshold: float = MISSING  # outlier threshold (activation magnitude); columns above it run in 16-bit


def is_quantized_module(module: Any) -> bool:
    return type(module._parameters.get("weight")).__name__ == "Int8Params"


def validate(method_cfg: Any) -> None:
    from qbench.errors import ConfigError

    if method_cfg.bits not in (None, 8):
        raise ConfigError(f"method.bits: {method_cfg.bits} is not supported by bnb_int8 (8)")
    if method_cfg.llm_int8_threshold < 0:
        raise ConfigError(f"method.llm_int8_threshold: {method_cfg.llm_int8_threshold} is negative")


def load(source: Any, method_cfg: Any, device_map: Any):
    import torch
    from transformers import BitsAndBytesConfig

    from qbench.load.models import from_pretrained

    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(method_cfg.llm_int8_threshold))
    model = from_pretrained(
        source, device_map=device_map, dtype=getattr(torch, method_cfg.dtype), quantization_config=quant
    )
    return model, {"quantization_config": quant.to_dict(), "quantize_s": None, "quantized_at_load": True}


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    # int8 weight + one fp32 scale (SCB) per output row
    return out_features * in_features + 4 * out_features
