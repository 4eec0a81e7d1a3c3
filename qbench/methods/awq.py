"""AWQ (Lin et al., 2023) through GPT-QModel: activation-aware scaling, then 4-bit group quantization.

AutoAWQ is archived; GPT-QModel 7.6 quantizes AWQ itself (``AWQConfig``, GEMM packing format, asymmetric
with zero points by default). Everything else (cache, calibration, kernels, child-process quantization) is
shared with GPTQ: see qbench/methods/_gptqmodel.py. On CPU, AWQ needs a 16-bit model (``method.dtype`` float16
or bfloat16) and the torch AWQ kernel (``awq_torch``), which is what ``backend: auto`` picks there; packing
always uses the torch AWQ packer, so quantizing never needs nvcc.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from qbench.calibration import CalibrationConfig
from qbench.config import MethodBase
from qbench.methods import _gptqmodel as gm
from qbench.methods._groups import check_group_divides

KIND = "awq"
EXTRA = gm.EXTRA
LIBRARIES = gm.LIBRARIES
is_quantized_module = gm.is_quantized_module
STATE_ATTRS: Dict[str, tuple] = {}  # qweight / qzeros / scales are registered buffers: the walk sees them

BITS = (4,)
GROUP_SIZES = (-1, 16, 32, 64, 128)  # the torch kernel serves AWQ up to 128
AWQ_FORMATS = ("gemm",)
# Short kernel names; the full GPT-QModel BACKEND value is "awq_<name>".
BACKENDS = ("marlin", "exllama_v2", "gemm", "gemm_triton", "gemv", "gemv_fast", "torch", "torch_aten",
            "torch_fused", "torch_int8", "machete", "bitblas", "swordfish")
MARLIN_NEEDS_SYM = False  # AWQ Marlin takes zero points
TRITON_BITS = ()  # no Triton fallback for AWQ: the torch kernel


@dataclass
class Config(MethodBase):
    kind: str = KIND
    bits: Optional[int] = 4  # bits per quantized weight (AWQ: 4 only)
    group_size: int = 128  # input weights per scale/zero (-1, 16, 32, 64, 128)
    sym: bool = False  # false = zero points (AWQ's "zero_point: true", the published setting)
    desc_act: bool = False  # no act-order in AWQ (must stay false)
    awq_format: str = "gemm"  # packed layout of the checkpoint: gemm (gemv / gemv_fast have CUDA-only kernels)
    backend: str = "auto"  # kernel at load: auto (cuda: marlin, cpu: torch) | one of BACKENDS
    checkpoint: Optional[str] = None  # pre-quantized AWQ checkpoint (Hub id or local dir): skip quantizing
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def validate(method_cfg: Any) -> None:
    gm.validate_common(method_cfg, KIND)


def validate_own(cfg: Any) -> None:
    from qbench.config import ConfigError

    if cfg.desc_act:
        raise ConfigError("method.desc_act: act-order is a GPTQ option; AWQ has none (set false)")
    if cfg.awq_format not in AWQ_FORMATS:
        raise ConfigError(
            f"method.awq_format: '{cfg.awq_format}' is not supported here ({', '.join(AWQ_FORMATS)}; "
            "gemv / gemv_fast have CUDA-only kernels and another packed layout)"
        )


def own_weight_settings(cfg: Any) -> Dict[str, Any]:
    """AWQ's part of the cache key's method settings."""
    return dict(format=cfg.awq_format)


def quantize_config(cfg: Any, common: Dict[str, Any]):
    from gptqmodel.quantization.config import AWQConfig

    return AWQConfig(**common, format=cfg.awq_format)


def check_widths(method_cfg: Any, widths: Dict[int, List[str]], model_name: str) -> None:
    """AWQ packs whole groups along the input dimension: group_size must divide every layer's input width
    (GPT-QModel otherwise fails minutes into quantization)."""
    check_group_divides(method_cfg.group_size, widths, model_name, ", which AWQ requires", GROUP_SIZES)


def load(source: Any, method_cfg: Any, device_map: Any):
    return gm.load_common(source, method_cfg, device_map, KIND)


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """Bytes of one AWQ GEMM-packed linear: qweight int32 [in, ceil(out*bits/32)] (packed along the output),
    qzeros int32 [groups, ceil(out*bits/32)], scales fp16/bf16 [groups, out]; no g_idx. g128 4-bit: 4.156
    bits/weight."""
    bits, gs = gm.bits_of(method_cfg), int(method_cfg.group_size)
    groups = math.ceil(in_features / (in_features if gs == -1 else gs))
    packed_out = math.ceil(out_features * bits / 32) * 4
    return in_features * packed_out + groups * packed_out + groups * out_features * 2
