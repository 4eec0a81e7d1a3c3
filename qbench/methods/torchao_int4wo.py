"""torchao int4 weight-only: each nn.Linear weight becomes 4-bit, asymmetric, in groups of ``group_size`` input
weights with a bfloat16 scale and zero point per group (tinygemm's layout), applied at load by transformers'
``TorchAoConfig``. Activations stay bfloat16; the tinygemm kernels dequantize inside the matmul.

torchao 0.18 has no one int4 layout for both devices: on CUDA, ``Int4WeightOnlyConfig(int4_packing_format=
"tile_packed_to_4d")`` (``_weight_int4pack_mm``, compute capability >= 8.0; the default "plain" format needs the
mslk package); on CPU, the prototype ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``,
``_weight_int4pack_mm_for_cpu``). ``packing_format: auto`` picks the first where torch sees CUDA, else the
second; the analytic bytes follow the same choice (the CUDA layout pads in_features to a multiple of 1024 and
out_features to a multiple of 8).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING

from qbench.config import MethodBase
from qbench.methods import _torchao
from qbench.methods._groups import check_group_divides

EXTRA = "torchao"
LIBRARIES = ("torchao",)
QUANTIZED_LINEARS = "transformers"
PACKING_FORMATS = ("auto", "tile_packed_to_4d", "opaque")
GROUP_SIZES = (32, 64, 128)  # what both layouts take (the CPU one stops at 128)


@dataclass
class Config(MethodBase):
    """torchao_int4wo's keys; each value comes from its YAML (conf/method/torchao_int4wo.yaml): none is declared here."""

    bits: int = MISSING  # bits per quantized weight (documentation; 4 only)
    group_size: int = MISSING  # input weights per scale/zero: 32 | 64 | 128
    # auto (CUDA present: tile_packed_to_4d, else opaque) | tile_packed_to_4d (CUDA tinygemm) | opaque (CPU tinygemm)
    packing_format: str = MISSING


def validate(method_cfg: Any) -> None:
    from qbench.errors import ConfigError

    if int(method_cfg.bits) != 4:
        raise ConfigError(f"method.bits: {method_cfg.bits} is not supported by torchao_int4wo (4)")
    if int(method_cfg.group_size) not in GROUP_SIZES:
        raise ConfigError(f"method.group_size: {method_cfg.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    if method_cfg.packing_format not in PACKING_FORMATS:
        raise ConfigError(f"method.packing_format: '{method_cfg.packing_format}' is not one of {', '.join(PACKING_FORMATS)}")
    if method_cfg.dtype != "bfloat16":
        raise ConfigError(f"method.dtype: '{method_cfg.dtype}' is not supported by torchao_int4wo (bfloat16: tinygemm's)")


def packing_format(method_cfg: Any, device: Optional[str] = None) -> str:
    """The layout ``auto`` stands for on ``device`` (cpu | cuda), or where torch sees CUDA on this host."""
    if method_cfg.packing_format != "auto":
        return str(method_cfg.packing_format)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "tile_packed_to_4d" if device == "cuda" else "opaque"


def check_device(method_cfg: Any, device: str, capability: Optional[Tuple[int, int]]) -> None:
    from qbench.errors import ConfigError

    fmt = packing_format(method_cfg, device)
    if fmt == "opaque" and device != "cpu":
        raise ConfigError(f"method.packing_format: opaque is torchao's CPU int4 layout; this cell runs on {device} "
                          "(use auto or tile_packed_to_4d)")
    if fmt == "tile_packed_to_4d" and (device != "cuda" or (capability is not None and capability < (8, 0))):
        raise ConfigError(f"method.packing_format: {fmt} (what auto picks where torch sees CUDA) needs a CUDA GPU of "
                          f"compute capability >= 8.0; this cell runs on {device}"
                          f"{f' {capability[0]}.{capability[1]}' if capability else ''} (on a CPU use opaque)")


def check_widths(method_cfg: Any, widths: Dict[int, List[str]], model_name: str) -> None:
    """torchao leaves a layer whose input width group_size does not divide unquantized, silently: refuse it."""
    check_group_divides(method_cfg.group_size, widths, model_name, " (torchao would leave it unquantized)")


def is_quantized_module(module: Any) -> bool:
    return type(module._parameters.get("weight")).__name__ in ("Int4TilePackedTo4dTensor", "Int4OpaqueTensor")


def _quant_type(method_cfg: Any):
    gs = int(method_cfg.group_size)
    if packing_format(method_cfg) == "opaque":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=gs, **_torchao.CONFIG_KWARGS)
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    return Int4WeightOnlyConfig(group_size=gs, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
                                **_torchao.CONFIG_KWARGS)


def load(source: Any, method_cfg: Any, device_map: Any):
    import torch
    from transformers import TorchAoConfig

    from qbench.load.models import from_pretrained

    values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    check_device(method_cfg, "cpu" if values == ["cpu"] else "cuda",
                 torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
    quant = TorchAoConfig(_quant_type(method_cfg))
    model = from_pretrained(source, device_map=device_map, dtype=torch.bfloat16, quantization_config=quant)
    return model, {"quantization_config": json.loads(json.dumps(quant.to_dict(), default=str)),
                   "packing_format": packing_format(method_cfg), "quantize_s": None, "quantized_at_load": True}


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """Two 4-bit weights per byte plus a bfloat16 scale and zero per group and output row (tinygemm's packed
    scale_and_zero [groups, out, 2]): 4 + 32/group_size bits/weight, 4.25 at group 128. The CUDA layout pads
    first: in_features to a multiple of 1024, out_features to a multiple of 8."""
    n_out, n_in = out_features, in_features
    if packing_format(method_cfg) == "tile_packed_to_4d":
        n_out, n_in = -(-n_out // 8) * 8, -(-n_in // 1024) * 1024
    return n_out * n_in // 2 + (n_in // int(method_cfg.group_size)) * n_out * 2 * 2
