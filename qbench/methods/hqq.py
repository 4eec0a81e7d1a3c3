"""HQQ (Badri & Shaji, 2023: Half-Quadratic Quantization): calibration-free 4-bit weights in groups of 64, with
a scale and a zero point per group optimised against the weight itself (no data), on the device, in seconds.

transformers 5 has ``HqqConfig`` but no HQQ loading path (``from_pretrained`` raises "HQQ is not available yet"
in 5.17 and 5.24: its quantizer has no quantize op), so the model is loaded in ``dtype`` and its linears are
replaced by hqq's own ``HQQLinear`` here, the same linears transformers' quantizers convert (all but lm_head /
tied / keep-in-fp32 modules). Each HQQLinear keeps ``W_q`` (uint8, two 4-bit values per byte) as a parameter
and ``meta["scale"]``, ``meta["zero"]`` (one each per group, in ``dtype``) and its bias as plain attributes:
STATE_ATTRS says so, so the footprint counts them. Runs on CPU (PyTorch backend: dequantize, then matmul) and
on CUDA.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List

from omegaconf import MISSING

from qbench.config import MethodBase
from qbench.methods._groups import check_group_divides

EXTRA = "hqq"
LIBRARIES = ("hqq",)
QUANTIZED_LINEARS = "transformers"
# HQQLinear: W_q is a parameter; scale / zero live in the dict ``meta``, the bias in a plain attribute
STATE_ATTRS = {"module": ("meta", "bias")}
BITS = (1, 2, 3, 4, 8)


@dataclass
class Config(MethodBase):
    """hqq's keys; each value comes from its YAML (conf/method/hqq.yaml): none is declared here."""

    bits: int = MISSING  # bits per quantized weight: 1 | 2 | 3 | 4 | 8
    group_size: int = MISSING  # weights per scale/zero along the input dimension (a multiple of 8 dividing in_features)
    axis: int = MISSING  # grouping axis: 1 (along the input dimension, what fast kernels take) | 0


def validate(method_cfg: Any) -> None:
    from qbench.errors import ConfigError

    if int(method_cfg.bits) not in BITS:
        raise ConfigError(f"method.bits: {method_cfg.bits} is not supported by hqq ({', '.join(map(str, BITS))})")
    gs = int(method_cfg.group_size)
    if gs <= 0 or gs % 8:
        raise ConfigError(f"method.group_size: {gs} must be a positive multiple of 8")
    if int(method_cfg.axis) not in (0, 1):
        raise ConfigError(f"method.axis: {method_cfg.axis} is not 0 or 1")
    if method_cfg.dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"method.dtype: '{method_cfg.dtype}' is not float16, bfloat16 or float32")


def check_widths(method_cfg: Any, widths: Dict[int, List[str]], model_name: str) -> None:
    """HQQ groups whole rows (axis 1): group_size must divide every layer's input width."""
    check_group_divides(method_cfg.group_size, widths, model_name, ", which hqq requires")


def is_quantized_module(module: Any) -> bool:
    return type(module).__name__ == "HQQLinear"


def load(source: Any, method_cfg: Any, device_map: Any):
    import torch
    from hqq.core.quantize import BaseQuantizeConfig
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from qbench.load.models import from_pretrained

    dtype = getattr(torch, method_cfg.dtype)
    model = from_pretrained(source, device_map=device_map, dtype=dtype)
    quant = BaseQuantizeConfig(nbits=int(method_cfg.bits), group_size=int(method_cfg.group_size),
                               axis=int(method_cfg.axis))
    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    targets = [name for name, mod in model.named_modules()
               if type(mod) is torch.nn.Linear and should_convert_module(name, skip)]
    t0 = time.perf_counter()
    for name in targets:
        _replace(model, name, quant, dtype)
    quantize_s = time.perf_counter() - t0
    return model, {"quantization_config": _plain(quant), "quantize_s": quantize_s, "quantized_at_load": True,
                   "quantized_linears": len(targets), "backend": "hqq PyTorch (dequantize + matmul)"}


def _replace(model: Any, name: str, quant: Dict[str, Any], dtype: Any) -> None:
    """Swap the nn.Linear ``name`` for an HQQLinear quantized on the linear's own device."""
    from hqq.core.quantize import HQQLinear

    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    setattr(parent, child, HQQLinear(linear, quant, del_orig=True, compute_dtype=dtype,
                                     device=str(linear.weight.device)))


def _plain(quant: Dict[str, Any]) -> Dict[str, Any]:
    """hqq's config dict as JSON-ready data (method_info)."""
    return {k: (_plain(v) if isinstance(v, dict) else v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
            for k, v in quant.items()}


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """W_q packed (4-bit: two per uint8; 8-bit: one; 2-bit: four; 1-bit: eight; 3-bit: ten per int32), plus a
    scale and a zero per group in ``dtype`` (float; hqq keeps the zero unrounded in meta). 4-bit group 64 in
    bfloat16: 4 + 2*16/64 = 4.5 bits/weight."""
    n, gs, bits = out_features * in_features, int(method_cfg.group_size), int(method_cfg.bits)
    groups = -(-n // gs)  # hqq views the weight as [groups, group_size] and packs along the groups
    if bits == 3:
        packed = 4 * -(-groups // 10) * gs  # ten 3-bit values per int32, groups padded to a multiple of 10
    else:
        packed = -(-n * bits // 8)
    dtype_bytes = 4 if method_cfg.dtype == "float32" else 2
    return packed + 2 * groups * dtype_bytes
