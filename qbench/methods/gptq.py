"""GPTQ (Frantar et al., 2022) through GPT-QModel: quantize once into the cache, then load with a chosen kernel.

What GPTQ shares with AWQ (cache, calibration, child-process quantization, kernels, checkpoint checks) is in
qbench/methods/_gptqmodel.py; this module holds what is GPTQ's own: its keys, its checks, its packed layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING

from qbench.config import MethodBase
from qbench.load.calibration import CalibrationConfig
from qbench.methods import _gptqmodel as gm

KIND = "gptq"
EXTRA = gm.EXTRA
LIBRARIES = gm.LIBRARIES
is_quantized_module = gm.is_quantized_module
STATE_ATTRS: Dict[str, tuple] = {}  # qweight / qzeros / scales / g_idx are registered buffers: the walk sees them

BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # group sizes some GPT-QModel kernel serves
# Short kernel names; the full GPT-QModel BACKEND value is "gptq_<name>".
BACKENDS = ("marlin", "exllama_v2", "triton", "torch", "torch_aten", "torch_fused", "torch_int8", "machete",
            "bitblas", "swordfish")
MARLIN_NEEDS_SYM = True  # GPTQ Marlin takes symmetric weights only
TRITON_BITS = (2, 4, 8)


@dataclass
class Config(MethodBase):
    """GPTQ's keys; each value comes from its YAML (conf/method/gptq.yaml, gptq_int8.yaml): none is declared here."""

    bits: Optional[int] = MISSING  # bits per quantized weight: 2 | 3 | 4 | 8
    group_size: int = MISSING  # input weights sharing one scale/zero (-1 = one group per row); should divide in_features
    sym: bool = MISSING  # symmetric quantization (zero point fixed at mid-range): what Marlin needs on a GPU
    desc_act: bool = MISSING  # act-order: quantize columns by decreasing Hessian diagonal
    # GPT-QModel's group-aware reordering (act-order within groups, keeps g_idx trivial); null = library default
    # (on when desc_act is off, in gptqmodel 7.6)
    act_group_aware: Optional[bool] = MISSING
    damp_percent: float = MISSING  # Hessian damping, fraction of the mean Hessian diagonal (0 < x < 1)
    # kernel at load: auto (cuda: marlin, cpu: torch; never machete, which downloads CUTLASS) | one of BACKENDS
    backend: str = MISSING
    checkpoint: Optional[str] = MISSING  # pre-quantized checkpoint (Hub id or local dir): skip quantizing
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def validate(method_cfg: Any) -> None:
    gm.validate_common(method_cfg, KIND)


def validate_own(cfg: Any) -> None:
    from qbench.errors import ConfigError

    if not 0 < float(cfg.damp_percent) < 1:
        raise ConfigError(f"method.damp_percent: {cfg.damp_percent} must lie strictly between 0 and 1")
    if cfg.desc_act and getattr(cfg, "act_group_aware", None):
        raise ConfigError("method.act_group_aware: true requires method.desc_act: false")


def own_weight_settings(cfg: Any) -> Dict[str, Any]:
    """GPTQ's part of the cache key's method settings."""
    return dict(desc_act=bool(cfg.desc_act), damp_percent=float(cfg.damp_percent),
                act_group_aware=getattr(cfg, "act_group_aware", None))


def quantize_config(cfg: Any, common: Dict[str, Any], device_type: str):
    from gptqmodel.quantization.config import GPTQConfig

    kwargs = dict(desc_act=bool(cfg.desc_act), damp_percent=float(cfg.damp_percent))
    if getattr(cfg, "act_group_aware", None) is not None:
        kwargs["act_group_aware"] = bool(cfg.act_group_aware)
    return GPTQConfig(**common, **kwargs)


def load(source: Any, method_cfg: Any, device_map: Any):
    return gm.load_common(source, method_cfg, device_map, KIND)


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """Bytes of one GPTQ-packed linear as GPT-QModel holds it (checkpoint layout = torch-kernel layout):
    qweight int32 [ceil(in*bits/32), out], qzeros int32 [groups, ceil(out*bits/32)], scales fp16/bf16
    [groups, out], g_idx int32 [in] (stored even without act-order). g128 4-bit: 4 + 16/128 + 4/128 =
    4.156 bits/weight, plus 32/out_features for g_idx."""
    bits, gs = gm.bits_of(method_cfg), int(method_cfg.group_size)
    groups = math.ceil(in_features / (in_features if gs == -1 else gs))
    qzeros = groups * math.ceil(out_features * bits / 32) * 4
    scales = groups * out_features * 2
    return math.ceil(in_features * bits / 32) * out_features * 4 + qzeros + scales + in_features * 4

