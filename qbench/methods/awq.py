"""AWQ (Lin et al., 2023) through GPT-QModel: activation-aware scaling, then 4-bit group quantization.

AutoAWQ is archived; GPT-QModel 7.6 quantizes AWQ itself (``AWQConfig``, GEMM packing format, asymmetric
with zero points by default). Everything else (cache, calibration, kernels, child-process quantization) is
shared with GPTQ: see qbench/methods/gptq.py. On CPU, AWQ needs a 16-bit model (``method.dtype`` float16 or
bfloat16) and the torch AWQ kernel (``awq_torch``), which is what ``backend: auto`` picks there; packing always
uses the torch AWQ packer, so quantizing never needs nvcc.
"""
from __future__ import annotations

from typing import Any, Dict, List

from qbench.methods import gptq

KIND = "awq"


def validate(method_cfg: Any) -> None:
    gptq.validate_common(method_cfg, KIND)


def check_widths(method_cfg: Any, widths: Dict[int, List[str]], model_name: str) -> None:
    """AWQ packs whole groups along the input dimension: group_size must divide every layer's input width
    (GPT-QModel otherwise fails minutes into quantization)."""
    gptq.check_group_divides(method_cfg, widths, model_name, KIND)


def load(source: Any, method_cfg: Any, device_map: Any):
    return gptq.load_common(source, method_cfg, device_map, KIND)


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """Bytes of one AWQ GEMM-packed linear: qweight int32 [in, ceil(out*bits/32)], qzeros int32
    [groups, ceil(out*bits/32)], scales fp16/bf16 [groups, out]; no g_idx. g128 4-bit: 4.156 bits/weight."""
    return gptq.packed_linear_bytes(
        out_features, in_features, gptq.bits_of(method_cfg), int(method_cfg.group_size), "awq"
    )
