"""Decode: what every decode path shares: the batch-major loop over the registry's paths (qbench.measure.
decode_paths), a figure's repeats, bounds and energy, and the compile limit of the compiled paths."""
from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any, Callable, Dict, List, Optional

from qbench.measure import decode_paths, gpu_state, memory, stats, timing
from qbench.measure.latency.common import (
    Target,
    _log_figure,
    _precision,
    _precision_warning,
    _say_if_slow,
    log,
    random_prompt,
)
from qbench.measure.latency.settings import Settings


def bandwidth_bound_tokens_per_s(
    bandwidth_bytes_per_s: Optional[float], weight_bytes: float, kv_bytes_per_seq: float, batch: int
) -> Optional[float]:
    """Upper bound on decode tokens/s from memory bandwidth: one step reads the weights once for the whole
    batch plus every sequence's KV cache, and yields one token per sequence:
    batch * bandwidth / (weight_bytes + batch * kv_bytes_per_seq)."""
    if not bandwidth_bytes_per_s:
        return None
    return batch * bandwidth_bytes_per_s / (weight_bytes + batch * kv_bytes_per_seq)


def mean_decode_context(prompt_tokens: int, new_tokens: int) -> float:
    """Mean KV length read by the timed decode steps: step i (1..new_tokens-1) attends over prompt + i
    tokens, so the mean is prompt + new_tokens / 2."""
    return prompt_tokens + new_tokens / 2.0


def _graph_breaks() -> Optional[int]:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:
        return None


def _tokens_per_s(batch: int) -> Callable[[List[float]], float]:
    return lambda steps: batch * (len(steps) - 1) / (steps[-1] - steps[0])


def _decode_label(path: str, batch: int) -> str:
    """How the log, the warnings and the compile messages name one decode figure."""
    return f"decode {path} bs={batch}"


def _compile_left_s(s: Settings, spent: List[float]) -> Optional[float]:
    """What is left of bench.max_compile_s after the cell's compiles so far (None: no limit)."""
    return None if s.max_compile_s is None else s.max_compile_s - sum(spent)


def _compile_deadline(s: Settings, path: str, batch: int, spent: List[float]):
    """The limit on a compiled path's first call at a batch size, where torch.compile does its work: what is left
    of bench.max_compile_s after the cell's earlier compiles, ``spent`` (none when it is null). The block's
    duration is appended to ``spent``."""
    label = _decode_label(path, batch)
    left_s = _compile_left_s(s, spent)
    if left_s is None:
        return _timed_block(contextlib.nullcontext(), spent, label)
    used = s.max_compile_s - left_s
    earlier = f" ({used:.0f} s of it spent on the cell's earlier compiles)" if used >= 0.5 else ""
    return _timed_block(timing.deadline(left_s, f"torch.compile of the {path} decode step at batch {batch} ran past "
                                                f"bench.max_compile_s={s.max_compile_s:g} s{earlier}"),
                        spent, label)


@contextlib.contextmanager
def _timed_block(inner, spent: List[float], label: str, every_s: float = 30.0):
    """``inner`` timed into ``spent``; meanwhile a line in the log every ``every_s`` while it runs, from a thread
    of its own: if a compile outlives its deadline (stuck in native code, where no alarm reaches), the log shows
    it still going, which a cell stopped from outside would otherwise not say."""
    import threading

    t0 = time.perf_counter()
    done = threading.Event()

    def heartbeat():
        while not done.wait(every_s):
            log.info("%s: first call (compile) still running after %.0f s", label, time.perf_counter() - t0)

    threading.Thread(target=heartbeat, daemon=True, name="qbench-compile-heartbeat").start()
    try:
        with inner:
            yield
    finally:
        done.set()
        spent.append(time.perf_counter() - t0)


def _decode_runner(t: Target, s: Settings, path: str, batch: int, energy_runs: List[Optional[float]],
                   compile_spent: List[float]):
    """The run_once of one (path, batch size): returns a run's step stamps, records its GPU energy. A compiled
    path's compile (its first timed call where FIRST_CALL_COMPILES, else what its ``prepare`` bounds, e.g. graph's
    recording) runs under what is left of bench.max_compile_s, its duration appended to ``compile_spent``."""
    mod = decode_paths.get(path)
    ids, mask = random_prompt(batch, s.decode_prompt_tokens, t.vocab, t.special_ids, s.seed, t.in_device)
    first = bool(mod.COMPILED and mod.FIRST_CALL_COMPILES)
    timed = mod.prepare(t, s, ids, mask, lambda: _compile_deadline(s, path, batch, compile_spent))

    def run_once():
        nonlocal first
        e0 = gpu_state.total_energy_j(t.device, t.gpu_indices) if t.cuda else None
        with _compile_deadline(s, path, batch, compile_spent) if first else contextlib.nullcontext():
            steps = timed()
        first = False
        e1 = gpu_state.total_energy_j(t.device, t.gpu_indices) if t.cuda else None
        energy_runs.append(e1 - e0 if e0 is not None and e1 is not None else None)
        return steps

    return run_once


def decode_row(t: Target, s: Settings, path: str, batch: int, compile_spent: Optional[List[float]] = None) -> tuple:
    """(row, repeat result) of one decode figure: the runs of ``path`` at ``batch`` and their bounds. A compiled
    path's first call may take what is left of bench.max_compile_s after ``compile_spent`` (the cell's earlier
    compiles), and its duration is appended there."""
    energy_runs: List[Optional[float]] = []
    run_once = _decode_runner(t, s, path, batch, energy_runs, compile_spent if compile_spent is not None else [])
    breaks0 = _graph_breaks()
    res = timing.repeat(run_once, value_of=_tokens_per_s(batch), after_warmup=_say_if_slow(_decode_label(path, batch), s, path),
                        **s.loop(path))
    breaks1 = _graph_breaks()
    steps = res["results"]
    compiled = decode_paths.compiled(path)
    tps = stats.summarize([_tokens_per_s(batch)(x) for x in steps], "tokens/s")
    per_token = stats.summarize([(b - a) * 1e3 for x in steps for a, b in itertools.pairwise(x)], "ms")
    kv_seq = memory.kv_cache_bytes(t.model_config, 1, 1, t.kv_dtype_bytes) * mean_decode_context(s.decode_prompt_tokens, s.new_tokens)
    bound = bandwidth_bound_tokens_per_s(t.datasheet_bandwidth, t.weight_bytes_read_per_token, kv_seq, batch)
    measured_bound = bandwidth_bound_tokens_per_s(t.measured_bandwidth, t.weight_bytes_read_per_token, kv_seq, batch)
    timed_energy = energy_runs[len(energy_runs) - len(steps):]
    energy = None
    if timed_energy and all(e is not None for e in timed_energy):
        # GPU board energy over the timed runs (generate's prefill included; graph: decode steps only)
        energy = sum(timed_energy) / (len(timed_energy) * batch * s.new_tokens)
    row = {
        "decode_path": path, "batch_size": batch, "prompt_tokens": s.decode_prompt_tokens, "new_tokens": s.new_tokens,
        "tokens_per_s": tps, "per_token_ms": per_token,
        "bandwidth_bound_tokens_per_s": bound,
        "bandwidth_bound_fraction": tps["p50"] / bound if bound else None,
        "measured_bandwidth_bound_tokens_per_s": measured_bound,
        "measured_bandwidth_bound_fraction": tps["p50"] / measured_bound if measured_bound else None,
        "weight_bytes_read_per_step": t.weight_bytes_read_per_token,
        "kv_bytes_read_per_step": int(batch * kv_seq),
        "energy_j_per_token": energy,
        "compiled": compiled and hasattr(t.model, "_compiled_call"),
        "graph_breaks": (breaks1 - breaks0) if compiled and None not in (breaks0, breaks1) else None,
        "precision": _precision(res, s),
    }
    return row, res


def _reason_of(exc: BaseException) -> str:
    """One line for a path that failed: a compile deadline by its own message, even where Dynamo or Inductor
    wrapped it in an error of theirs."""
    cause: Optional[BaseException] = exc
    seen = set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, timing.DeadlineExceeded):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    exc = cause if isinstance(cause, timing.DeadlineExceeded) else exc
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _unsupported_at_start(t: Target, s: Settings) -> Dict[str, Optional[str]]:
    """path -> why it cannot run on this model and device at all (its module's unsupported_reason), or None."""
    reason: Dict[str, Optional[str]] = {}
    for path in s.decode_paths:
        check = getattr(decode_paths.get(path), "unsupported_reason", None)
        reason[path] = check(t) if check is not None else None
    return reason


def _fail(path: str, batch: int, exc: BaseException, reason: Dict[str, Optional[str]], failed_at: Dict[str, int],
          label: str) -> None:
    """Record a compiled path that failed at ``batch``, and every path that replays its compiled step with it:
    without that step, such a path would compile one itself and time something else."""
    reason[path] = _reason_of(exc)
    failed_at[path] = batch
    log.warning("%s: not measured (%s)", label, reason[path])
    for other in reason:
        if getattr(decode_paths.get(other), "REPLAYS", None) == path and reason[other] is None:
            reason[other], failed_at[other] = f"needs the {path} path's compiled step ({reason[path]})", batch


def _record_row(path: str, batch: int, row: Dict[str, Any], res: Dict[str, Any], s: Settings,
                out: Dict[str, Any]) -> None:
    """One measured figure into the section: its row, its first call, its log line and warnings."""
    mod = decode_paths.get(path)
    label = _decode_label(path, batch)
    out["decode"].append(row)
    out["one_time"]["decode"].append({"decode_path": path, "batch_size": batch, "first_call_s": res["first_call_s"]})
    if mod.COMPILED and mod.FIRST_CALL_COMPILES and out["one_time"]["compile_s"] is None:
        out["one_time"]["compile_s"] = res["first_call_s"]  # the cell's first compile of a decode step
    _log_figure(label, row["tokens_per_s"], res)
    out["warnings"].extend(w for w in (stats.cv_warning(label, row["tokens_per_s"], s.cv_warn_threshold),
                                       _precision_warning(label, res, s, path)) if w)


def measure_decode(t: Target, s: Settings, out: Dict[str, Any]) -> None:
    """Every decode path at every batch size, batch-major, into out["decode"] / out["unsupported"]."""
    import torch

    if s.new_tokens < 2:
        out["warnings"].append(f"decode: new_tokens={s.new_tokens}; per-step timing needs at least 2 tokens, decode not measured")
        return
    reason = _unsupported_at_start(t, s)
    failed_at: Dict[str, int] = {}
    # bench.max_compile_s bounds the cell's compiles together (static at batch 1, its batch-dynamic recompile at
    # 8, graph's recordings): a limit per call would let a cell compile for that long once per batch size
    compile_spent: List[float] = []
    for batch in s.batch_sizes:
        for path in s.decode_paths:
            if reason[path] is not None:
                continue
            label, compiled = _decode_label(path, batch), decode_paths.compiled(path)
            if compiled and batch not in s.compiled_batch_sizes:
                log.info("%s: not run (bench.compiled_batch_sizes=%s)", label, s.compiled_batch_sizes)
                continue
            left = _compile_left_s(s, compile_spent)
            if compiled and left is not None:
                log.info("%s: starting (compiles may take %.1f s more of bench.max_compile_s)", label, left)
            try:
                row, res = decode_row(t, s, path, batch, compile_spent)
            except torch.OutOfMemoryError:
                raise  # the cell records it as class oom
            except Exception as exc:  # a method whose kernels cannot take this path (compile fails, ...)
                if not compiled:
                    raise
                _fail(path, batch, exc, reason, failed_at, label)
                continue
            _record_row(path, batch, row, res, s, out)
        out["kv_shapes"].append({"batch_size": batch, "seq_len_tokens": s.decode_prompt_tokens + s.new_tokens,
                                 "bytes": memory.kv_cache_bytes(t.model_config, batch, s.decode_prompt_tokens + s.new_tokens, t.kv_dtype_bytes)})
    for path in s.decode_paths:
        if reason[path] is not None:
            # batch_size: where it failed (larger batch sizes were not tried); null: the path never applies
            out["unsupported"].append({"decode_path": path, "reason": reason[path], "batch_size": failed_at.get(path)})
            at = f" from bs={failed_at[path]}" if path in failed_at else ""
            out["warnings"].append(f"decode {path}: not measured{at} ({reason[path]})")
