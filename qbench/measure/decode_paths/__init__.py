"""The decode-path registry: every module of this folder whose name does not start with "_" is a decode path, its
name the path's name in ``bench.decode_paths`` and in result.json's ``decode_path``. Modules are imported lazily
and import nothing heavy (torch, transformers) at import time, so that validating and reporting stay fast.

A decode path module owns everything about its path:

    LABEL         how the report names it (a column head, a chart legend)
    DESCRIPTION   what it runs, in a few words (the unit line under its column head)
    ORDER         where it runs among the paths at one batch size (ascending), and where the report lists it. A
                  path that reuses another's compiled step runs after it.
    COMPILED      whether its decode step is compiled (torch.compile). A compiled path: runs only at
                  bench.compiled_batch_sizes; its first call at a batch size (where the compile happens) runs under
                  what is left of bench.max_compile_s; it warms up until steady (up to bench.max_warmup_runs: a
                  compiled step keeps speeding up for a few calls); its failure is recorded as unsupported from
                  that batch size instead of failing the cell; its rows count Dynamo's graph breaks. An uncompiled
                  path warms up bench.warmup_runs only and an error in it fails the cell.
    FIRST_CALL_COMPILES
                  (compiled paths) whether the first timed call compiles: it then runs under the compile limit,
                  and its duration is the section's ``one_time.compile_s``. False for a path that compiles in
                  ``prepare`` instead.
    prepare(t, s, ids, mask, compile_limit) -> run
                  what one run of the path at these prompts is: a zero-argument function returning the step
                  stamps of one run (seconds, relative to the first stamp, which follows the prefill). ``t`` is the
                  qbench.measure.latency.target.Target, ``s`` the Settings, ``compile_limit()`` a context manager
                  that bounds a compile by what is left of bench.max_compile_s (for work done in prepare).

Optional:

    TIME_CAP_KEY  the bench key of its figures' own time cap, used where it is not null (default: none, every
                  figure's bench.max_time_per_figure_s)
    REPLAYS       the path whose compiled step it reuses: when that path fails, this one is recorded unsupported
                  with it
    unsupported_reason(t) -> str | None
                  why the path cannot run on this model and device at all (then it is recorded unsupported and
                  never tried)

Adding a decode path: write qbench/measure/decode_paths/<name>.py (tests/test_decode_paths.py registers one from a
temporary folder and follows it through latency into the report). Validation (qbench.run.preflight), the latency
loop, the report's tidy table, charts and decode-gap columns iterate over this registry. Paths are named elsewhere
only where the report compares them by their meaning: the summary leads with static where measured, else eager
(report.tables.DECODE_PATH_PREFERENCE), and the decode-gap table measures generate's share as static against graph.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Iterable, List

from qbench.errors import ConfigError


def names() -> List[str]:
    """Every decode path, in ORDER (the order they run in at one batch size and the report lists them)."""
    return sorted(_known(), key=_order)


def get(name: str, key: str = "bench.decode_paths") -> ModuleType:
    """The module of decode path ``name``; an unknown name fails in one line naming the key and the known ones."""
    known = _known()
    if name not in known:
        raise ConfigError(f"{key}: '{name}' is not one of {', '.join(sorted(known, key=_order))}")
    return importlib.import_module(f"{__name__}.{name}")


def _known() -> List[str]:
    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def _order(name: str) -> tuple:
    return (importlib.import_module(f"{__name__}.{name}").ORDER, name)


def ordered(paths: Iterable[str], key: str = "bench.decode_paths") -> List[str]:
    """``paths`` without repeats, each checked, in run order (a path that replays another's step runs after it)."""
    chosen = list(dict.fromkeys(str(p) for p in paths))
    return sorted(chosen, key=lambda p: (get(p, key).ORDER, p))


def compiled(name: str) -> bool:
    """Whether path ``name`` compiles its decode step; False for a name no registered path has (an old result)."""
    try:
        return bool(get(name).COMPILED)
    except ConfigError:
        return False


def label(name: str) -> str:
    """How the report names path ``name``; the name itself for one no registered path has (an old result)."""
    try:
        return str(get(name).LABEL)
    except ConfigError:
        return name
