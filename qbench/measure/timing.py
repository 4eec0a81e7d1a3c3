"""Timers and the repeat loop every timed figure goes through.

CPU work is timed with ``time.perf_counter``. CUDA work is asynchronous: the host returns from a launch before
the GPU has done it, so GPU figures come from CUDA events recorded on the stream (``elapsed_time`` between two
events on the same device), after synchronizing so that one run does not overlap the next.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Optional


class Spent:
    """Seconds the loops below spent, summed over every figure while :func:`collect` is active: for a cell's time
    budget (where the time went), not for any figure. ``warmup_s`` and ``timed_s`` exclude what ran inside a
    :func:`deadline` block (latency's torch.compile calls), which is ``bounded_s``; the static path compiles in its
    first warm-up, and that compile would otherwise be counted twice."""

    def __init__(self) -> None:
        self.warmup_s = 0.0
        self.timed_s = 0.0
        self.bounded_s = 0.0
        self.figures = 0

    def as_dict(self) -> Dict[str, float]:
        return {"warmup_s": self.warmup_s, "timed_s": self.timed_s, "bounded_s": self.bounded_s,
                "figures": self.figures}


_COLLECTORS: List[Spent] = []


@contextlib.contextmanager
def collect():
    """Sum the seconds of every :func:`repeat` and :func:`deadline` in the block into the yielded :class:`Spent`.
    A hook only: it changes no loop, so the figures are the same with and without it."""
    spent = Spent()
    _COLLECTORS.append(spent)
    try:
        yield spent
    finally:
        _COLLECTORS.remove(spent)


def _add(field_name: str, seconds: float) -> None:
    for spent in _COLLECTORS:
        setattr(spent, field_name, getattr(spent, field_name) + seconds)


def account(warmup_s: float, timed_s: float, figures: int) -> None:
    """Seconds of warm-ups and timed runs that a loop outside this module spent (llama.cpp's, in its worker
    process), added to every active :func:`collect` as :func:`repeat` adds its own."""
    _add("warmup_s", float(warmup_s))
    _add("timed_s", float(timed_s))
    _add("figures", int(figures))


def _bounded_total() -> float:
    return _COLLECTORS[-1].bounded_s if _COLLECTORS else 0.0


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


def _ci_half_width_pct(values: List[float]) -> Optional[float]:
    from qbench.measure.stats import median_ci

    return median_ci(sorted(values))["half_width_pct"]


def warm_up(run_once: Callable[[], Any], *, min_runs: int, max_runs: int, steady_pct: float,
            max_time_s: Optional[float] = None, clock: Callable[[], float] = time.perf_counter) -> List[float]:
    """Discarded runs before timing: at least ``min_runs``, then more while each run is still faster than the one
    before by more than ``steady_pct`` % (host seconds: the one-time costs of a first call, a compiled path that
    keeps speeding up for a few calls after its compile), at most ``max_runs``, and only while the warm-ups after
    the first have taken less than ``max_time_s`` (the figure's time cap; the first holds the compile, which has
    a limit of its own). A run that is not faster ends the warm-up: on a noisy host (generate's Python)
    run-to-run scatter is not a transient, and waiting for two runs to agree would only burn time. Without the
    time bound a slow figure (seconds a run, a compiled kernel slow at a large batch) could warm up for minutes
    before its first timed run. Returns each warm-up's host seconds (the first holds the one-time costs)."""
    seconds: List[float] = []
    while len(seconds) < max(min_runs, 0) or (
        len(seconds) < max_runs and (len(seconds) < 2 or seconds[-1] < seconds[-2] * (1 - steady_pct / 100))
        and (max_time_s is None or sum(seconds[1:]) < max_time_s)
    ):
        t0 = clock()
        run_once()
        seconds.append(clock() - t0)
    return seconds


def repeat(
    run_once: Callable[[], Any],
    *,
    warmup_runs: int,
    min_repeats: int,
    max_repeats: int,
    min_duration_s: float,
    target_ci_pct: Optional[float] = None,
    max_time_s: Optional[float] = None,
    value_of: Callable[[Any], float] = float,
    max_warmup_runs: Optional[int] = None,
    steady_pct: float = 2.0,
    after_warmup: Optional[Callable[[List[float]], None]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, Any]:
    """Warm up (:func:`warm_up`; ``max_warmup_runs`` > ``warmup_runs`` lets a path that is still speeding up warm
    up further, within ``max_time_s``; ``after_warmup`` is then called with the warm-ups' seconds), then repeat
    ``run_once`` until the figure is precise or a limit is reached:

    * precise: at least ``min_repeats`` runs and ``min_duration_s`` seconds timed, and the 95 % CI of the median
      of ``value_of(result)`` is within ``target_ci_pct`` % of the median (None: stop at the minimums);
    * ``max_time_s`` seconds timed (after ``min_repeats``): the cap, flagged as ``stopped_by: "time_cap"``;
      0 asks for the minimums only (``stopped_by: "min_repeats"``, unless they already met the target);
    * ``max_repeats`` runs.

    ``run_once`` returns its own measurement (a number, a list of step timestamps, ...): it must finish its
    device work before returning (synchronize), because the durations are counted on the host ``clock``.

    Returns ``{"results": [...], "first_call_s", "warmup_s": [...], "timed_s", "n", "stopped_by",
    "ci_half_width_pct"}``. ``first_call_s`` is the host time of the first warm-up call (the one-time costs:
    lazy init, kernel loading, compilation); it is null when there is no warm-up, and then the first call is
    among the results, as asked.
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"repeat: need 1 <= min_repeats ({min_repeats}) <= max_repeats ({max_repeats})")
    bounded0 = _bounded_total()
    with gc_paused():
        warmup_s = warm_up(run_once, min_runs=warmup_runs, max_runs=max(warmup_runs, max_warmup_runs or 0),
                           steady_pct=steady_pct, max_time_s=max_time_s, clock=clock)
        bounded1 = _bounded_total()
        _add("warmup_s", sum(warmup_s) - (bounded1 - bounded0))
        if after_warmup is not None:
            after_warmup(warmup_s)
        results: List[Any] = []
        values: List[float] = []  # value_of of each result, read only when there is a precision target
        timed_s = 0.0
        stopped_by, half = "max_repeats", None
        while len(results) < max_repeats:
            t0 = clock()
            results.append(run_once())
            timed_s += clock() - t0
            if target_ci_pct is not None:
                values.append(float(value_of(results[-1])))
            if len(results) < min_repeats or timed_s < min_duration_s:
                continue
            if target_ci_pct is None:
                stopped_by = "min_repeats"
                break
            half = _ci_half_width_pct(values)
            if half is not None and half <= target_ci_pct:
                stopped_by = "precision"
                break
            if max_time_s == 0:  # asked for the minimums only: no cap was hit
                stopped_by = "min_repeats"
                break
            if max_time_s is not None and timed_s >= max_time_s:
                stopped_by = "time_cap"
                break
    _add("timed_s", timed_s - (_bounded_total() - bounded1))
    _add("figures", 1)
    if half is None:
        with contextlib.suppress(TypeError, ValueError):  # results that are no figure (a test's None) have no CI
            half = _ci_half_width_pct(values or [float(value_of(r)) for r in results])
    first: Optional[float] = warmup_s[0] if warmup_s else None
    return {"results": results, "first_call_s": first, "warmup_s": warmup_s, "timed_s": timed_s, "n": len(results),
            "stopped_by": stopped_by, "ci_half_width_pct": half}


class DeadlineExceeded(Exception):
    """Raised inside a :func:`deadline` block that ran past its time."""


@contextlib.contextmanager
def deadline(seconds: Optional[float], message: str):
    """Raise DeadlineExceeded(message) in the block once it has run ``seconds`` (None: no limit), and again every
    second after that, in case a library caught the first one and carried on (Dynamo and Inductor wrap errors
    raised while they compile, and a wrapped one still ends the block). SIGALRM interrupts Python between
    bytecodes and wakes a thread waiting on a lock or a future, so it stops a compile in Python or one waiting on
    its worker processes. Only the main thread receives signals: elsewhere the block runs without a limit. An
    alarm that was already set (a test timeout) is put back, less the time this block took. Its seconds go to
    the active :func:`collect` as ``bounded_s``."""
    t_block = time.perf_counter()
    try:
        with _deadline(seconds, message):
            yield
    finally:
        _add("bounded_s", time.perf_counter() - t_block)


@contextlib.contextmanager
def _deadline(seconds: Optional[float], message: str):
    """:func:`deadline` without the bookkeeping."""
    import signal
    import threading

    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    done = []

    def on_alarm(signum, frame):
        if not done:  # the block may have just ended: then the alarm is late, not a breach
            raise DeadlineExceeded(message)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1e-3), 1.0)
    t0 = time.monotonic()
    try:
        yield
    finally:
        done.append(True)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - t0), 1e-3), outer_interval)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while a figure is measured (collected once before), as benchmark
    harnesses do: a collection that lands inside one timed generate step (generate allocates thousands of small
    objects a step) would be a host hiccup charged to the method."""
    import gc

    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
