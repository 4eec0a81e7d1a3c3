"""Pin the measuring process to CPU cores (``bench.cpu_affinity``) and say which cores it could use.

Decode at batch 1 is launch-bound: the Python around each step runs on the host CPU, so where the scheduler
puts the process moves tokens/s. The cell applies this before torch is imported, so every thread torch and
CUDA start later inherits the affinity. A cell that cannot be pinned runs unpinned and says why.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from qbench.measure import gpu_state

GPU_LOCAL = "gpu_local"
# NVML fills an array of C unsigned longs, 64 bits wide on Linux (the only OS where pinning applies)
NVML_WORD_BITS = 64
# Linux stops far below this (CONFIG_NR_CPUS <= 8192); the cap keeps a typo like 0-10000000 from building a huge set
_MAX_CPU = 1 << 16
_CPU_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def parse_cpulist(text: Any) -> List[int]:
    """The CPUs of a Linux cpulist, sorted: "0-3,8" -> [0, 1, 2, 3, 8]; an int 2 means "2". ValueError if malformed."""
    cpus: Set[int] = set()
    for part in str(text).split(","):
        match = _CPU_RANGE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"'{part}' is not a CPU number or a range like 0-3")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first or last >= _MAX_CPU:
            raise ValueError(f"'{part}' is not a range of CPU numbers below {_MAX_CPU}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpulist`, for messages: [0, 1, 2, 3, 8] -> "0-3,8"."""
    ranges: List[List[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def cpus_from_bitmask(words: Iterable[int]) -> Set[int]:
    """CPUs set in NVML's affinity words: bit b of word i is CPU i * 64 + b."""
    return {i * NVML_WORD_BITS + b for i, word in enumerate(words) for b in range(NVML_WORD_BITS) if (word >> b) & 1}


def gpu_local_cpus(num_gpus: int) -> Set[int]:
    """Union of the CPUs NVML reports as local to the cell's GPUs; RuntimeError saying why where it cannot tell.

    Reads CUDA_VISIBLE_DEVICES, never torch: this runs before CUDA initialises."""
    pynvml = gpu_state.nvml()
    if pynvml is None:
        raise RuntimeError("NVML is not available (no NVIDIA driver)")
    visible = len(gpu_state.visible_gpus())
    if min(num_gpus, visible) == 0:
        raise RuntimeError("the cell uses no GPU")
    n_words = -(-(os.cpu_count() or 1) // NVML_WORD_BITS)
    cpus: Set[int] = set()
    for cuda_index in range(min(num_gpus, visible)):
        handle = gpu_state.nvml_handle_from_mask(cuda_index)
        if handle is None:
            raise RuntimeError(f"NVML finds no GPU for CUDA device {cuda_index}")
        cpus |= cpus_from_bitmask(pynvml.nvmlDeviceGetCpuAffinity(handle, n_words))
    return cpus


def cpus_in_effect() -> Optional[List[int]]:
    """The CPUs this process may run on, sorted; None where the OS cannot say (macOS)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _wanted_cpus(requested: Any, num_gpus: int) -> Set[int]:
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("this OS cannot pin a process (no os.sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    if requested == GPU_LOCAL:
        local = gpu_local_cpus(num_gpus)
        if not local & allowed:
            raise RuntimeError(f"the CPUs local to the GPU(s) ({format_cpulist(local) or 'none'}) are none of "
                               f"those this process may use ({format_cpulist(allowed)})")
        return local & allowed
    wanted = set(parse_cpulist(requested))
    # The kernel would silently narrow a partly-allowed set; a run that asked for cores it did not get says so
    if not wanted <= allowed:
        raise RuntimeError(f"CPU(s) {format_cpulist(wanted - allowed)} are not among those this process may "
                           f"use ({format_cpulist(allowed)})")
    return wanted


def apply_cpu_affinity(requested: Any, num_gpus: int) -> Tuple[Dict[str, Any], Optional[str]]:
    """Pin this process as ``bench.cpu_affinity`` asks (None: leave the OS's choice).

    Returns the record for result.json, ``{"requested", "cpus" (in effect afterwards), "applied"}``, and a warning
    saying why the pinning was not applied (None where it was, or was not asked for). Never raises."""
    applied, warning = False, None
    if requested is not None:
        try:
            os.sched_setaffinity(0, _wanted_cpus(requested, num_gpus))
            applied = True
        except Exception as exc:  # an unpinned measurement still counts: record why, carry on
            warning = f"bench.cpu_affinity={requested} not applied, the cell ran unpinned: {exc}"
    return {"requested": requested, "cpus": cpus_in_effect(), "applied": applied}, warning
