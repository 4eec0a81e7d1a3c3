"""torchao int8 weight-only: each nn.Linear weight becomes int8 with one scale per output row (symmetric, per
channel; torchao 0.18 ``Int8WeightOnlyConfig``, version 2: an ``Int8Tensor`` subclass holding qdata int8 [out,
in], scale fp32 [out, 1] and zero_point int8 [out, 1]). Activations stay in ``dtype``: the weight is dequantized
for the matmul. Applied at load by transformers' ``TorchAoConfig``, on CPU and CUDA alike.

The footprint counts a tensor subclass by the inner tensors it flattens into (qbench.measure.memory), so this
module says nothing about where the state lives.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from qbench.config import MethodBase
from qbench.methods import _torchao

EXTRA = "torchao"
LIBRARIES = ("torchao",)
# transformers' torchao quantizer converts every nn.Linear but lm_head / tied / keep-in-fp32 modules
QUANTIZED_LINEARS = "transformers"


@dataclass
class Config(MethodBase):
    """torchao_int8wo's keys; each value comes from its YAML (conf/method/torchao_int8wo.yaml): none is declared here."""

    bits: int = MISSING  # bits per quantized weight (documentation; 8 only)


def validate(method_cfg: Any) -> None:
    from qbench.errors import ConfigError

    if int(method_cfg.bits) != 8:
        raise ConfigError(f"method.bits: {method_cfg.bits} is not supported by torchao_int8wo (8)")
    # method.dtype is checked for every method by qbench.config.validate


def is_quantized_module(module: Any) -> bool:
    return type(module._parameters.get("weight")).__name__ == "Int8Tensor"


def load(source: Any, method_cfg: Any, device_map: Any):
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, PerRow
    from transformers import TorchAoConfig

    from qbench.load.models import from_pretrained

    quant = TorchAoConfig(Int8WeightOnlyConfig(granularity=PerRow(), **_torchao.CONFIG_KWARGS))
    model = from_pretrained(source, device_map=device_map, dtype=getattr(torch, method_cfg.dtype),
                            quantization_config=quant)
    return model, {"quantization_config": json.loads(json.dumps(quant.to_dict(), default=str)),
                   "quantize_s": None, "quantized_at_load": True}


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """int8 qdata, plus one fp32 scale and one int8 zero point per output row: 8 + 40/in_features bits/weight."""
    return out_features * in_features + out_features * (4 + 1)
