"""Timers and the repeat loop every timed figure goes through.

CPU work is timed with ``time.perf_counter``. CUDA work is asynchronous: the host returns from a launch before
the GPU has done it, so GPU figures come from CUDA events recorded on the stream (``elapsed_time`` between two
events on the same device), after synchronizing so that one run does not overlap the next.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional


def is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


def synchronize(device: Any) -> None:
    """Wait for every visible GPU (a model spread with device_map="auto" runs on several); no-op on CPU."""
    if not is_cuda(device):
        return
    import torch

    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def timer_name(device: Any) -> str:
    return "cuda_events" if is_cuda(device) else "perf_counter"


def time_call(fn: Callable[[], Any], device: Any, event_device: Any = None) -> tuple:
    """(seconds, result) of one call of ``fn``.

    On CUDA the interval is between two events recorded on ``event_device``'s current stream (the device the
    output lands on: for a model spread over GPUs, every earlier device's work precedes it). All GPUs are
    synchronized first, so the start event fires as soon as it is recorded and the interval covers launch
    gaps too, as a user would see them.
    """
    if not is_cuda(device):
        t0 = time.perf_counter()
        result = fn()
        return time.perf_counter() - t0, result
    import torch

    dev = torch.device(event_device if event_device is not None else device)
    synchronize(device)
    stream = torch.cuda.current_stream(dev)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record(stream)
    result = fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3, result


def repeat(
    run_once: Callable[[], Any],
    *,
    warmup_runs: int,
    min_repeats: int,
    max_repeats: int,
    min_duration_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, Any]:
    """Call ``run_once`` ``warmup_runs`` times (discarded), then repeat it until both at least ``min_repeats``
    runs and at least ``min_duration_s`` seconds of timed runs are done, or ``max_repeats`` runs are done.

    ``run_once`` returns its own measurement (a number, a list of step timestamps, ...): it must finish its
    device work before returning (synchronize), because the duration budget is counted on the host ``clock``.

    Returns ``{"results": [...], "first_call_s", "warmup_s": [...], "timed_s", "n"}``. ``first_call_s`` is the
    host time of the first warm-up call (the one-time costs: lazy init, kernel loading, compilation); it is
    null when ``warmup_runs`` is 0, and then the first call is among the results, as asked.
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"repeat: need 1 <= min_repeats ({min_repeats}) <= max_repeats ({max_repeats})")
    warmup_s: List[float] = []
    for _ in range(warmup_runs):
        t0 = clock()
        run_once()
        warmup_s.append(clock() - t0)
    results: List[Any] = []
    timed_s = 0.0
    while len(results) < max_repeats:
        t0 = clock()
        results.append(run_once())
        timed_s += clock() - t0
        if len(results) >= min_repeats and timed_s >= min_duration_s:
            break
    first: Optional[float] = warmup_s[0] if warmup_s else None
    return {"results": results, "first_call_s": first, "warmup_s": warmup_s, "timed_s": timed_s, "n": len(results)}
