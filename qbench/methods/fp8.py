"""FP8: float8 e4m3 weights with one fp32 scale per output row, and activations quantized to float8 on the fly
(per token, dynamic) for a float8 x float8 matmul (``torch._scaled_mm``, cuBLASLt) that accumulates in fp32.
Needs an NVIDIA GPU with FP8 tensor cores: compute capability >= 8.9 (Ada, Hopper H100/H200, Blackwell).

Through torchao 0.18's ``Float8DynamicActivationFloat8WeightConfig`` (``Float8Tensor``) in transformers'
``TorchAoConfig``, not transformers' ``FineGrainedFP8Config``: the latter's matmul is the Triton kernel
``kernels-community/finegrained-fp8``, which transformers (5.17 and later) fetches from the Hub at first use, so
it cannot run on an offline node; torchao's row-wise path calls torch's built-in ``_scaled_mm`` (or mslk's
kernel where that package is installed), nothing to download or build. On a CPU, or a GPU below 8.9, the
method is refused at preflight (and again at load, for a SLURM sweep whose login node cannot tell).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from omegaconf import MISSING

from qbench.config import MethodBase
from qbench.methods import _torchao

EXTRA = "torchao"
LIBRARIES = ("torchao",)
QUANTIZED_LINEARS = "transformers"
COMPUTE_DTYPE = "float8_e4m3fn"  # the matmuls run in fp8 (no fp8 peak in the GPU spec table: no compute bound)
GRANULARITIES = ("row", "tensor")
MIN_CAPABILITY = (8, 9)


@dataclass
class Config(MethodBase):
    """fp8's keys; each value comes from its YAML (conf/method/fp8.yaml): none is declared here."""

    bits: int = MISSING  # bits per quantized weight (documentation; float8 e4m3)
    granularity: str = MISSING  # scales of weights and activations: row (one per output row / token) | tensor (one)


def validate(method_cfg: Any) -> None:
    from qbench.errors import ConfigError

    if int(method_cfg.bits) != 8:
        raise ConfigError(f"method.bits: {method_cfg.bits} is not supported by fp8 (8)")
    if method_cfg.granularity not in GRANULARITIES:
        raise ConfigError(f"method.granularity: '{method_cfg.granularity}' is not one of {', '.join(GRANULARITIES)}")
    if method_cfg.dtype not in ("bfloat16", "float16"):
        raise ConfigError(f"method.dtype: '{method_cfg.dtype}' is not supported by fp8 (bfloat16, float16)")


def check_device(method_cfg: Any, device: str, capability: Optional[Tuple[int, int]]) -> None:
    from qbench.errors import ConfigError

    if device != "cuda" or capability is None or tuple(capability) < MIN_CAPABILITY:
        where = "a CPU" if device != "cuda" else f"a GPU of compute capability {capability[0]}.{capability[1]}" if capability else "a GPU"
        raise ConfigError(f"method.kind: fp8 needs FP8 tensor cores (an NVIDIA GPU of compute capability >= 8.9: "
                          f"Ada, Hopper, Blackwell); this cell runs on {where}")


def is_quantized_module(module: Any) -> bool:
    return type(module._parameters.get("weight")).__name__ == "Float8Tensor"


def quant_type(method_cfg: Any):
    """torchao's config for ``method_cfg`` (also used by the tests to build Float8Tensors on a CPU)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    granularity = PerRow() if method_cfg.granularity == "row" else PerTensor()
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, **_torchao.CONFIG_KWARGS)


def load(source: Any, method_cfg: Any, device_map: Any):
    import torch
    from transformers import TorchAoConfig

    from qbench.load.models import from_pretrained

    values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    on_gpu = values != ["cpu"] and torch.cuda.is_available()
    check_device(method_cfg, "cuda" if on_gpu else "cpu", torch.cuda.get_device_capability() if on_gpu else None)
    quant = TorchAoConfig(quant_type(method_cfg))
    model = from_pretrained(source, device_map=device_map, dtype=getattr(torch, method_cfg.dtype),
                            quantization_config=quant)
    return model, {"quantization_config": json.loads(json.dumps(quant.to_dict(), default=str)),
                   "quantize_s": None, "quantized_at_load": True}


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """One byte per weight plus fp32 scales: one per output row (8 + 32/in_features bits/weight), or one."""
    scales = out_features if method_cfg.granularity == "row" else 1
    return out_features * in_features + 4 * scales
