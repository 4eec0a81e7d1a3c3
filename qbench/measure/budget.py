"""Where a cell's seconds went: a flat budget of named seconds that adds up to the cell's wall time.

The cell (qbench/run/cell.py) calls :meth:`CellClock.lap` at the end of each of its steps, in order, so that every
second from the parent's spawn (or, without one, from the start of ``cell.run``) to the end of the cell lands
in exactly one step; a step that reports its own parts (a load that quantized, a latency phase with its
warm-ups, timed runs and compiles, an evaluation with its task building and model calls) is then divided with
:meth:`CellClock.split`, its rest named ``<step>_other_s``. What no lap covered is ``unaccounted_s``. Seconds are
host wall-clock seconds (``time.perf_counter``; across the process boundary ``time.time``).
docs/results.md (``timings.budget``) names every key; docs/time_budget.md says what the figures were.
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, Optional

# The parts of a cell that measure something (their seconds are the figures' cost); the rest is overhead_s:
# starting, importing, loading and quantizing, compiling, building lm-eval's tasks, and what the steps do besides.
# quality_s: a budget written before the quality phase was split (its parts since: quality_model_calls_s, the
# forward passes, and quality_compare_s, the live comparison with the baseline; the rest reads and writes files).
MEASURING = ("memory_s", "latency_warmup_s", "latency_timed_s", "eval_model_calls_s", "eval_perplexity_s",
             "quality_model_calls_s", "quality_compare_s", "quality_s")


class CellClock:
    """Laps over one cell. ``spawned_unix``: the parent's ``time.time()`` just before it started the process
    (None: the clock starts now, as for a cell run in-process); ``first_line``: the child's
    ``(time.time(), time.perf_counter())`` at its first line."""

    def __init__(self, spawned_unix: Optional[float] = None, first_line: Optional[tuple] = None,
                 clock=time.perf_counter) -> None:
        self.clock = clock
        self.parts: Dict[str, float] = {}
        now = clock()
        if spawned_unix is not None and first_line is not None:
            first_unix, first_perf = first_line
            # the start of the process until its first line: the interpreter, site-packages, the qbench package
            self.parts["process_start_s"] = max(first_unix - float(spawned_unix), 0.0)
            self.start = first_perf - self.parts["process_start_s"]
            self.last = first_perf
        else:
            self.start = self.last = now

    def lap(self, name: str) -> float:
        """The seconds since the previous lap, added to ``name``."""
        now = self.clock()
        seconds = now - self.last
        self.last = now
        self.parts[name] = self.parts.get(name, 0.0) + seconds
        return seconds

    def split(self, name: str, parts: Dict[str, Optional[float]], rest: Optional[str] = None) -> None:
        """Divide step ``name`` (e.g. ``load_s``) into ``parts`` (None or 0: absent); what they leave goes to
        ``rest`` (default: ``name`` itself). Parts that claim more than the step took (a library's own clock
        around more than the step) are scaled down to it, so that nothing is counted twice."""
        total = self.parts.pop(name, 0.0)
        given = {k: float(v) for k, v in parts.items() if v}
        claimed = sum(given.values())
        scale = total / claimed if claimed > total > 0 else (0.0 if claimed > total else 1.0)
        for k, v in given.items():
            self.parts[k] = self.parts.get(k, 0.0) + v * scale
        rest = rest or name
        self.parts[rest] = self.parts.get(rest, 0.0) + total - claimed * scale

    def wall_s(self) -> float:
        return self.clock() - self.start

    def budget(self, wall_s: float) -> Dict[str, float]:
        """The flat budget: every part, and ``unaccounted_s`` = ``wall_s`` − their sum."""
        out = dict(self.parts)
        out["unaccounted_s"] = wall_s - sum(self.parts.values())
        return out


def overhead_s(budget: Dict[str, float], wall_s: float, measuring: Iterable[str] = MEASURING) -> float:
    """Wall time less the parts that measure something."""
    return wall_s - sum(budget.get(k, 0.0) for k in measuring)
