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

from omegaconf import MISSING

from qbench.config import MethodBase
from qbench.load.calibration import CalibrationConfig
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
    """AWQ's keys; each value comes from its YAML (conf/method/awq.yaml): none is declared here."""

    bits: Optional[int] = MISSING  # bits per quantized weight (AWQ: 4 only)
    group_size: int = MISSING  # input weights per scale/zero (-1, 16, 32, 64, 128)
    sym: bool = MISSING  # false = zero points (AWQ's "zero_point: true", the published setting)
    desc_act: bool = MISSING  # no act-order in AWQ (must stay false)
    awq_format: str = MISSING  # packed layout of the checkpoint: gemm (gemv / gemv_fast have CUDA-only kernels)
    backend: str = MISSING  # kernel at load: auto (cuda: marlin, cpu: torch) | one of BACKENDS
    # GPT-QModel's scale search streams its reference outputs through host memory and back, chunk by chunk, for
    # each of its 20 ratios: calibration tokens x hidden x 2 bytes per scaled group and ratio, copied to the host
    # and back every time (the volume for SmolLM2: docs/gptq_awq.md). false keeps them on the GPU (+ about
    # 2 x calibration tokens x hidden x 2 bytes); true streams; null: false on a GPU, true on a CPU
    scale_search_chunked: Optional[bool] = MISSING
    checkpoint: Optional[str] = MISSING  # pre-quantized AWQ checkpoint (Hub id or local dir): skip quantizing
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def validate(method_cfg: Any) -> None:
    gm.validate_common(method_cfg, KIND)


def validate_own(cfg: Any) -> None:
    from qbench.errors import ConfigError

    if cfg.desc_act:
        raise ConfigError("method.desc_act: act-order is a GPTQ option; AWQ has none (set false)")
    if cfg.awq_format not in AWQ_FORMATS:
        raise ConfigError(
            f"method.awq_format: '{cfg.awq_format}' is not supported here ({', '.join(AWQ_FORMATS)}; "
            "gemv / gemv_fast have CUDA-only kernels and another packed layout)"
        )


def own_weight_settings(cfg: Any) -> Dict[str, Any]:
    """AWQ's part of the cache key's method settings (the clip search too: its fp32 sums pick a different
    clip than GPT-QModel's 16-bit ones for ~2 % of the groups, so its checkpoints are not the library's; and
    the scale search's loss summation order)."""
    return dict(format=cfg.awq_format, clip_search=CLIP_SEARCH,
                scale_search_chunked=getattr(cfg, "scale_search_chunked", None))


def quantize_config(cfg: Any, common: Dict[str, Any], device_type: str):
    from gptqmodel.quantization.config import AWQConfig

    chunked = getattr(cfg, "scale_search_chunked", None)
    if chunked is None:  # streaming to host memory and back only pays where device memory is the limit
        chunked = device_type != "cuda"
    return AWQConfig(**common, format=cfg.awq_format, scale_search_chunked_activations=bool(chunked))


def check_widths(method_cfg: Any, widths: Dict[int, List[str]], model_name: str) -> None:
    """AWQ packs whole groups along the input dimension: group_size must divide every layer's input width
    (GPT-QModel otherwise fails minutes into quantization)."""
    check_group_divides(method_cfg.group_size, widths, model_name, ", which AWQ requires", GROUP_SIZES)


def load(source: Any, method_cfg: Any, device_map: Any):
    return gm.load_common(source, method_cfg, device_map, KIND)


# ---------------------------------------------------------------------------------------------------------
# clip search at matmul speed (runs in the quantizing child)

# Names the clip search below in the cache key and the metadata; bump it when its arithmetic changes.
CLIP_SEARCH = "qbench-bmm-v1"
# Working memory of one output-channel chunk of the clip search (reference + candidate outputs, in fp32).
CLIP_CHUNK_BYTES = 256 * 2**20


def best_clip(processor: Any, w: Any, input_feat: Any, n_grid: int = 20, max_shrink: float = 0.5,
              n_sample_token: int = 512):
    """AWQ's clip search (GPT-QModel's ``AWQProcessor._compute_best_clip``, same grid, same token sample, same
    answer) with the per-group products as one batched matmul.

    GPT-QModel forms ``input_feat * w`` as a [out, tokens, groups, group_size] tensor for each of the 10
    shrink ratios and sums it: the largest temporary of AWQ and, on a CPU, most of its time (profile:
    docs/gptq_awq.md). Here the same sums are ``bmm([groups, out, gs], [groups, gs, tokens])``: products
    summed in fp32 inside the matmul instead of rounded to 16 bits first, and the error compared in fp32.
    Returns the best max |w| per (output channel, group): [out, groups, 1], what ``apply_clip`` takes.
    """
    import torch

    out_features, in_features = w.shape
    gs = processor.qcfg.group_size if processor.qcfg.group_size > 0 else in_features
    groups = in_features // gs
    x = input_feat.reshape(-1, in_features)
    x = x[:: max(1, x.shape[0] // n_sample_token)]  # GPT-QModel's token subsample
    x = x.to(device=w.device, dtype=w.dtype).reshape(-1, groups, gs).permute(1, 2, 0)  # [groups, gs, tokens]
    w_grouped = w.reshape(out_features, groups, gs)
    chunk = max(1, min(out_features, CLIP_CHUNK_BYTES // (3 * 4 * groups * x.shape[-1])))
    best_all = []
    for start in range(0, out_features, chunk):
        wb = w_grouped[start : start + chunk]  # [chunk, groups, gs]
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # [chunk, groups, 1]
        org_out = torch.bmm(wb.transpose(0, 1), x).float()  # [groups, chunk, tokens]
        best = org_max.clone()
        min_err = torch.full(org_max.shape, float("inf"), dtype=torch.float32, device=w.device)
        clamped, quant = torch.empty_like(wb), torch.empty_like(wb)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i_s / n_grid)
            torch.clamp(wb, -max_val, max_val, out=clamped)
            processor._pseudo_quantize_tensor_into(clamped, quant)
            cur_out = torch.bmm(quant.transpose(0, 1), x)
            err = (cur_out.float() - org_out).pow_(2).mean(dim=-1).transpose(0, 1).unsqueeze(-1)
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        best_all.append(best)
    return torch.cat(best_all, dim=0)


def before_quantize() -> Dict[str, str]:
    """Called in the quantizing child before GPT-QModel's loop: what qbench changed in it (the metadata's
    ``quantize_speedups``)."""
    return {"clip_search": use_fast_clip_search()}


def use_fast_clip_search() -> str:
    """Route GPT-QModel's AWQ clip search through :func:`best_clip`, when its signature is the one this was
    written against (gptqmodel 7.6); returns what runs, for the checkpoint's metadata."""
    import inspect

    from gptqmodel.looper.awq_processor import AWQProcessor

    original = AWQProcessor._compute_best_clip
    if getattr(original, "__qbench__", False):
        return CLIP_SEARCH
    params = list(inspect.signature(original).parameters)
    if params != ["self", "w", "input_feat", "n_grid", "max_shrink", "n_sample_token"]:
        return "gptqmodel (signature changed; qbench's faster search not applied)"

    def _compute_best_clip(self, w, input_feat, n_grid=20, max_shrink=0.5, n_sample_token=512):
        import torch

        with torch.inference_mode():
            return best_clip(self, w, input_feat, n_grid, max_shrink, n_sample_token)

    _compute_best_clip.__qbench__ = True
    AWQProcessor._compute_best_clip = _compute_best_clip
    return CLIP_SEARCH


def linear_weight_bytes(out_features: int, in_features: int, method_cfg: Any) -> float:
    """Bytes of one AWQ GEMM-packed linear: qweight int32 [in, ceil(out*bits/32)] (packed along the output),
    qzeros int32 [groups, ceil(out*bits/32)], scales fp16/bf16 [groups, out]; no g_idx. g128 4-bit: 4.156
    bits/weight."""
    bits, gs = gm.bits_of(method_cfg), int(method_cfg.group_size)
    groups = math.ceil(in_features / (in_features if gs == -1 else gs))
    packed_out = math.ceil(out_features * bits / 32) * 4
    return in_features * packed_out + groups * packed_out + groups * out_features * 2
