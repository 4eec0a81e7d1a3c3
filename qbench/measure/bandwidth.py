"""The memory bandwidth a GPU really delivers, measured in about a second: the bound cells compare against.

A datasheet's figure (4.8 TB/s for an H200) is a peak no kernel reaches; what a device-to-device copy reaches
on this very card is the practical ceiling of a memory-bound decode step, and it differs between nodes (clocks,
ECC, power caps, HBM stacks). Each GPU cell measures it once, so a decode figure reads as a % of its own card.

Method: ``dst.copy_(src)`` of one large buffer (half of ``buffer_bytes`` each way, far beyond L2), timed with
CUDA events; a copy reads and writes every byte, so bytes moved = 2 x the buffer. Median over the repeats,
with its 95 % CI (order statistics).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

from qbench.measure import stats, timing

DEFAULT_BUFFER_BYTES = 2 << 30  # 1 GiB read + 1 GiB written per copy: far past L2, long enough for CUDA events
REPEATS = 30


def copy_bandwidth(device: Any, buffer_bytes: int = DEFAULT_BUFFER_BYTES, repeats: int = REPEATS) -> Optional[Dict[str, Any]]:
    """``{"bytes_per_s": Dist-like median figure, "buffer_bytes", "method"}`` for a CUDA device, None on CPU or
    when the buffer does not fit (less than 4x its size free: the model and its cache come first)."""
    if not timing.is_cuda(device):
        return None
    import torch

    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    half = int(min(buffer_bytes, free // 4)) // 2
    if half < (64 << 20):  # below 64 MiB the copy would sit in cache-sized territory: not a DRAM figure
        return None
    src = torch.empty(half, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    try:
        for _ in range(3):  # first touches, clocks up
            dst.copy_(src)
        seconds = [timing.time_call(functools.partial(dst.copy_, src), device)[0] for _ in range(repeats)]
    finally:
        del src, dst
        torch.cuda.empty_cache()
    dist = stats.summarize([2 * half / s for s in seconds if s > 0], "bytes/s")
    return {"bytes_per_s": dist["p50"], "dist": dist, "buffer_bytes": 2 * half,
            "method": "device-to-device copy_ of one buffer, read + write bytes / CUDA-event time, median"}
