"""Datasheet figures of common GPUs: memory bandwidth and peak dense throughput per dtype, for the bounds.

Figures are the vendor's, dense (without 2:4 structured sparsity: NVIDIA's datasheets print the sparse figure
with an asterisk; dense is half of it). An unknown GPU gets no row (the bounds are then null): a figure is
never guessed. ``bench.gpu_spec_overrides`` can correct a row or add one, keyed by the row name ("H100 SXM")
or by the exact device name torch reports ("NVIDIA H100 80GB HBM3").

Fields: mem_bandwidth_gb_s (GB/s, 1e9 bytes), peak_tflops_{fp32,tf32,fp16,bf16} (1e12 FLOP/s, tensor cores
where the dtype has them, FP32 on the CUDA cores), peak_tops_int8 (1e12 int8 op/s). Null: the GPU lacks it.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, Mapping, Optional

FIELDS = ("mem_bandwidth_gb_s", "peak_tflops_fp32", "peak_tflops_tf32", "peak_tflops_fp16", "peak_tflops_bf16", "peak_tops_int8")

# Sources (NVIDIA datasheets; sparse figures halved):
#   H100 SXM / PCIe / NVL: "NVIDIA H100 Tensor Core GPU" datasheet (SXM: 3.35 TB/s, FP32 67, TF32 989*, BF16/FP16
#     1,979*, INT8 3,958*; PCIe: 2 TB/s, FP32 51, TF32 756*, BF16/FP16 1,513*, INT8 3,026*; NVL (per GPU):
#     3.9 TB/s, FP32 60, TF32 835*, BF16/FP16 1,671*, INT8 3,341*; * = with sparsity)
#   H200 SXM / NVL: "NVIDIA H200 Tensor Core GPU" datasheet (4.8 TB/s; SXM as H100 SXM; NVL as H100 NVL)
#   A100: "NVIDIA A100 Tensor Core GPU" datasheet (FP32 19.5, TF32 156, BF16/FP16 312, INT8 624 dense;
#     40GB SXM/PCIe 1,555 GB/s, 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s)
#   L40S: "NVIDIA L40S" datasheet (864 GB/s, FP32 91.6, TF32 183, BF16/FP16 362.05, INT8 733 dense)
#   A10: "NVIDIA A10 Tensor Core GPU" datasheet (600 GB/s, FP32 31.2, TF32 62.5, BF16/FP16 125, INT8 250 dense)
#   L4: "NVIDIA L4 Tensor Core GPU" datasheet (300 GB/s, FP32 30.3, TF32 120*, BF16/FP16 242*, INT8 485*)
#   T4: "NVIDIA T4" datasheet (320 GB/s, FP32 8.1, FP16 mixed 65, INT8 130; Turing: no TF32, no BF16)
#   RTX 4090: "NVIDIA Ada GPU Architecture" whitepaper, appendix (1,008 GB/s, FP32 82.6, TF32 82.6,
#     FP16/BF16 with FP32 accumulate 165.2 (what torch matmuls use), INT8 660.6 dense)
#   RTX 3090: "NVIDIA Ampere GA102 GPU Architecture" whitepaper (936 GB/s, FP32 35.6, TF32 35.6,
#     FP16/BF16 with FP32 accumulate 71, INT8 284 dense)
SPECS: Dict[str, Dict[str, Optional[float]]] = {
    "H100 SXM": dict(mem_bandwidth_gb_s=3350, peak_tflops_fp32=67, peak_tflops_tf32=494.5, peak_tflops_fp16=989.5, peak_tflops_bf16=989.5, peak_tops_int8=1979),
    "H100 PCIe": dict(mem_bandwidth_gb_s=2000, peak_tflops_fp32=51, peak_tflops_tf32=378, peak_tflops_fp16=756.5, peak_tflops_bf16=756.5, peak_tops_int8=1513),
    "H100 NVL": dict(mem_bandwidth_gb_s=3900, peak_tflops_fp32=60, peak_tflops_tf32=417.5, peak_tflops_fp16=835.5, peak_tflops_bf16=835.5, peak_tops_int8=1670.5),
    "H200": dict(mem_bandwidth_gb_s=4800, peak_tflops_fp32=67, peak_tflops_tf32=494.5, peak_tflops_fp16=989.5, peak_tflops_bf16=989.5, peak_tops_int8=1979),
    "H200 NVL": dict(mem_bandwidth_gb_s=4800, peak_tflops_fp32=60, peak_tflops_tf32=417.5, peak_tflops_fp16=835.5, peak_tflops_bf16=835.5, peak_tops_int8=1670.5),
    "A100 40GB SXM": dict(mem_bandwidth_gb_s=1555, peak_tflops_fp32=19.5, peak_tflops_tf32=156, peak_tflops_fp16=312, peak_tflops_bf16=312, peak_tops_int8=624),
    "A100 80GB SXM": dict(mem_bandwidth_gb_s=2039, peak_tflops_fp32=19.5, peak_tflops_tf32=156, peak_tflops_fp16=312, peak_tflops_bf16=312, peak_tops_int8=624),
    "A100 40GB PCIe": dict(mem_bandwidth_gb_s=1555, peak_tflops_fp32=19.5, peak_tflops_tf32=156, peak_tflops_fp16=312, peak_tflops_bf16=312, peak_tops_int8=624),
    "A100 80GB PCIe": dict(mem_bandwidth_gb_s=1935, peak_tflops_fp32=19.5, peak_tflops_tf32=156, peak_tflops_fp16=312, peak_tflops_bf16=312, peak_tops_int8=624),
    "L40S": dict(mem_bandwidth_gb_s=864, peak_tflops_fp32=91.6, peak_tflops_tf32=183, peak_tflops_fp16=362.05, peak_tflops_bf16=362.05, peak_tops_int8=733),
    "A10": dict(mem_bandwidth_gb_s=600, peak_tflops_fp32=31.2, peak_tflops_tf32=62.5, peak_tflops_fp16=125, peak_tflops_bf16=125, peak_tops_int8=250),
    "L4": dict(mem_bandwidth_gb_s=300, peak_tflops_fp32=30.3, peak_tflops_tf32=60, peak_tflops_fp16=121, peak_tflops_bf16=121, peak_tops_int8=242.5),
    "T4": dict(mem_bandwidth_gb_s=320, peak_tflops_fp32=8.1, peak_tflops_tf32=None, peak_tflops_fp16=65, peak_tflops_bf16=None, peak_tops_int8=130),
    "RTX 4090": dict(mem_bandwidth_gb_s=1008, peak_tflops_fp32=82.6, peak_tflops_tf32=82.6, peak_tflops_fp16=165.2, peak_tflops_bf16=165.2, peak_tops_int8=660.6),
    "RTX 3090": dict(mem_bandwidth_gb_s=936, peak_tflops_fp32=35.6, peak_tflops_tf32=35.6, peak_tflops_fp16=71, peak_tflops_bf16=71, peak_tops_int8=284),
}

# Device names as torch.cuda.get_device_name / nvidia-smi print them, most specific first. Word boundaries
# keep "A10" from matching "A100", "L4" from "L40S", "RTX 3090" from "RTX 3090 Ti". A name that matches
# nothing (a bare "NVIDIA H100", an A10G, an L40) is unknown: no row, no guess.
PATTERNS = [
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b.*(\bhbm3\b|\bsxm)", "H100 SXM"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"^(nvidia )?h200( sxm\S*)?( \d+gb( hbm3e)?)?$", "H200"),
    (r"\ba100\b.*\bsxm\S*.*\b40gb\b", "A100 40GB SXM"),
    (r"\ba100\b.*\bsxm\S*.*\b80gb\b", "A100 80GB SXM"),
    (r"\ba100\b.*\bpcie\b.*\b40gb\b|\ba100\b.*\b40gb\b.*\bpcie\b", "A100 40GB PCIe"),
    (r"\ba100\b.*\bpcie\b.*\b80gb\b|\ba100\b.*\b80gb\b.*\bpcie\b", "A100 80GB PCIe"),
    (r"\bl40s\b", "L40S"),
    (r"\ba10\b(?!\w)", "A10"),
    (r"\bl4\b(?!\w)", "L4"),
    (r"\bt4\b(?!\w)", "T4"),
    (r"\brtx 4090\b(?!\s*(d|ti)\b)", "RTX 4090"),
    (r"\brtx 3090\b(?!\s*ti\b)", "RTX 3090"),
]


def match(device_name: str) -> Optional[str]:
    """The spec row name for a device name, or None when unknown."""
    name = re.sub(r"[-_]", " ", device_name.strip().lower())
    name = re.sub(r"\s+", " ", name)
    for pattern, row in PATTERNS:
        if re.search(pattern, name):
            return row
    return None


def lookup(device_name: Optional[str], overrides: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The spec row for ``device_name`` as a dict (name, device_name, source, FIELDS), or None when unknown.

    ``overrides`` (bench.gpu_spec_overrides) maps a row name or an exact device name to fields that replace
    the table's; a device the table does not know gets a row only from an override naming it.
    """
    if not device_name:
        return None
    overrides = {str(k): dict(v) for k, v in (overrides or {}).items()}
    row_name = match(device_name)
    row: Optional[Dict[str, Any]] = None
    if row_name is not None:
        row = {"name": row_name, "device_name": device_name, "source": "datasheet", **copy.deepcopy(SPECS[row_name])}
    for key in (row_name, device_name):
        if key is not None and key in overrides:
            extra = overrides[key]
            unknown = set(extra) - set(FIELDS) - {"name"}
            if unknown:
                raise ValueError(f"bench.gpu_spec_overrides.{key}: unknown field(s) {sorted(unknown)}; known: {list(FIELDS)}")
            if row is None:
                row = {"name": key, "device_name": device_name, **dict.fromkeys(FIELDS)}
            row.update(extra)
            row["source"] = "override" if row.get("source") != "datasheet" else "datasheet+override"
    return row


def for_device(device: Any, overrides: Optional[Mapping[str, Any]] = None, index: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The spec row of the CUDA device the model runs on; None on CPU or for an unknown GPU."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    idx = index if index is not None else (torch.device(device).index or 0)
    return lookup(torch.cuda.get_device_name(idx), overrides)


def dtype_key(dtype: Any) -> Optional[str]:
    """fp32 | tf32 | fp16 | bf16 | int8 for a torch dtype or a name; fp32 matmuls count as tf32 when torch
    is allowed to use TF32 tensor cores for them (torch.backends.cuda.matmul.allow_tf32)."""
    name = str(dtype).replace("torch.", "").lower()
    table = {"float32": "fp32", "fp32": "fp32", "tf32": "tf32", "float16": "fp16", "fp16": "fp16", "half": "fp16",
             "bfloat16": "bf16", "bf16": "bf16", "int8": "int8"}
    key = table.get(name)
    if key == "fp32":
        try:
            import torch

            if torch.backends.cuda.matmul.allow_tf32:
                return "tf32"
        except Exception:  # torch missing or too old: fp32 it is
            pass
    return key


def peak_flops(spec: Optional[Mapping[str, Any]], dtype: Any) -> Optional[float]:
    """Peak dense FLOP/s (op/s for int8) of ``spec`` for ``dtype``; None when unknown."""
    if spec is None:
        return None
    key = dtype_key(dtype)
    field = {"fp32": "peak_tflops_fp32", "tf32": "peak_tflops_tf32", "fp16": "peak_tflops_fp16",
             "bf16": "peak_tflops_bf16", "int8": "peak_tops_int8"}.get(key or "")
    value = spec.get(field) if field else None
    return float(value) * 1e12 if value is not None else None


def bandwidth_bytes_per_s(spec: Optional[Mapping[str, Any]]) -> Optional[float]:
    if spec is None or spec.get("mem_bandwidth_gb_s") is None:
        return None
    return float(spec["mem_bandwidth_gb_s"]) * 1e9
