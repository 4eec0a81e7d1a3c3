"""fp32 / fp16 / bf16: no quantization, the weights cast to one dtype. The baselines of every sweep."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from qbench.config import MethodBase
from qbench.measure.memory import DTYPE_BYTES  # the one table of a dtype's bytes

EXTRA = None  # torch and transformers only
LIBRARIES = ()


@dataclass
class Config(MethodBase):
    """The dtype kind's key; its value comes from each YAML (conf/method/fp32.yaml, fp16.yaml, bf16.yaml)."""

    bits: Optional[int] = MISSING  # bits per weight (documentation; checked against dtype)


def validate(method_cfg: Any) -> None:
    from qbench.errors import ConfigError

    if method_cfg.bits not in (None, 8 * DTYPE_BYTES.get(method_cfg.dtype, 0)):
        raise ConfigError(f"method.bits: {method_cfg.bits} does not match method.dtype {method_cfg.dtype}")


def load(source: Any, method_cfg: Any, device_map: Any):
    import torch

    from qbench.load.models import from_pretrained

    model = from_pretrained(source, device_map=device_map, dtype=getattr(torch, method_cfg.dtype))
    return model, {"dtype": method_cfg.dtype}


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    return out_features * in_features * DTYPE_BYTES[method_cfg.dtype]
