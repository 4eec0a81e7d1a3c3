"""One cell, in its own process: load → quantize → measure (memory, latency, accuracy) → store.

Started by qbench.run.cell_process.run_cell as ``python -m qbench.run.cell <spec.json>``. Whatever happens, the cell ends in a
result.json: ``ok`` with its metrics, or ``error`` with the error class, message, traceback and the phase it
failed in, plus every metric measured before the failure. The one exception is a stop (Ctrl-C, SIGTERM, SIGHUP,
or the death of the sweep that started it): a stopped cell writes nothing, so that the next run of the sweep
redoes it, and it ends by the same signal so that its parent (or SLURM) reads how it ended.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

# The cell process's first line (unix, perf_counter), after the standard library's few milliseconds: the
# process's start-up ends here (timings.budget.process_start_s)
FIRST_LINE = (time.time(), time.perf_counter())

log = logging.getLogger("qbench.run.cell")


# Host allocation failures, whoever raised them: torch's CPU allocator ("DefaultCPUAllocator: can't allocate
# memory: you tried to allocate N bytes", or "not enough memory"), CUDA's ("out of memory"), numpy's
# _ArrayMemoryError (a MemoryError, "Unable to allocate 7.45 GiB for an array"), glibc / C++ ("Cannot allocate
# memory", "std::bad_alloc").
_OOM_TEXT = ("out of memory", "defaultcpuallocator", "can't allocate memory", "cannot allocate memory",
             "not enough memory", "unable to allocate", "bad_alloc")
# Filesystem faults after preflight: the disk filled up, a quota, a path of the wrong type, a name too long
_FS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST)


def classify(exc: BaseException) -> str:
    """Error class stored in the result: oom | config | filesystem | exception."""
    from qbench.errors import ConfigError

    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return "oom"
    except ImportError:  # pragma: no cover
        pass
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or any(t in text for t in _OOM_TEXT) or getattr(exc, "errno", None) == errno.ENOMEM:
        return "oom"
    if isinstance(exc, ConfigError):
        return "config"
    if isinstance(exc, OSError) and exc.errno in _FS_ERRNOS:
        return "filesystem"
    return "exception"


# ----------------------------------------------------------------------------------------------- stopping
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal as an exception. A KeyboardInterrupt, so every ``except Exception`` (Hydra's, a library's)
    lets it through and every ``finally`` runs: the subprocesses a cell started are killed by subprocess.run's
    own cleanup, lock files are closed, and no result is written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


_stop_received: list = []  # the stop signal this process received, once it has received one


def _raise_stopped(signum: int, frame: Any) -> None:
    # the first signal starts an orderly stop; a second one (Ctrl-C to a whole process group, then the sweep
    # passing it on) must not break into the cleanup with a traceback. Bounded: the sweep kills after its grace
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _stop_received.append(int(signum))
    raise Stopped(signum)


def raise_if_stopped(cause: Optional[BaseException] = None) -> None:
    """Raise :class:`Stopped` again if a stop signal has arrived. A library may catch the KeyboardInterrupt the
    handler raised and raise its own error instead (or swallow it): whatever failed after a stop failed because
    of it, and must not become an error row of the method's (SLURM's scancel signals every process of a job)."""
    if _stop_received:
        raise Stopped(_stop_received[0]) from cause


def install_stop_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Stopped`. SIGTERM and SIGHUP end Python at once by default,
    with no ``finally`` run and no message: that is how SLURM, systemd, Kubernetes, ``timeout`` and a closed
    terminal stop a job. A signal the process inherited as ignored (nohup's SIGHUP) stays ignored."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_stopped)


def signal_exit_status(signum: int) -> int:
    """The shell's status for a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + int(signum)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: Optional[int]) -> None:
    """SIGTERM to this cell process when the sweep that started it dies, even by SIGKILL, so that no orphan goes
    on measuring on a device whose slot lock another sweep may take. Linux: prctl(PR_SET_PDEATHSIG); elsewhere a
    thread that polls the parent's pid. A parent already gone before this ran is caught by the pid check."""
    if not parent_pid:
        return
    if _FORKED["sweep_watch"]:
        _watch_sweep(parent_pid)
        parent_pid = os.getppid()  # and the fork server: its death (the sweep's end) ends the cell too
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
    if armed:
        return

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="qbench-parent-watch", daemon=True).start()


_FORKED: Dict[str, Any] = {"sweep_watch": False}  # set in a cell forked by run.preload's server (forked_main)


def _watch_sweep(sweep_pid: int) -> None:
    """A forked cell's parent is the fork server, not the sweep: a thread waits on the sweep's pidfd (Linux)
    and sends SIGTERM to this cell when the sweep is gone, as PR_SET_PDEATHSIG does for a plain spawn."""
    try:
        pidfd = os.pidfd_open(sweep_pid)
    except ProcessLookupError:  # the sweep is already gone
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def wait() -> None:
        import select

        select.select([pidfd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="qbench-sweep-watch", daemon=True).start()


def _size_thread_pools() -> None:
    """torch was imported in the fork server under the sweep's environment and CPU affinity; its intra-op pool
    is sized lazily, but OpenMP read OMP_NUM_THREADS and the affinity when it loaded. Size it here as a plain
    spawn would: OMP_NUM_THREADS if set, else the CPUs this cell may run on (cpu_affinity applied before)."""
    import torch

    n = os.environ.get("OMP_NUM_THREADS", "").strip()
    torch.set_num_threads(int(n) if n.isdigit() and int(n) > 0 else len(os.sched_getaffinity(0)))


def forked_main(spec_path: str, env: Dict[str, str], lock_fds: list) -> int:
    """A cell forked by run.preload's server (qbench/run/preload.py): the cell's own environment replaces the
    server's before anything reads it, its clock starts at this line, then main as for a plain spawn.
    ``lock_fds`` are the cell and slot locks, held open until the process ends."""
    global FIRST_LINE
    FIRST_LINE = (time.time(), time.perf_counter())
    enter_forked(env, lock_fds)
    return main([spec_path])


def enter_forked(env: Dict[str, str], lock_fds: list) -> None:
    """The cell's environment in place of the server's: CUDA, the allocator and Inductor read it at first use,
    which comes after this (the server never initialised CUDA)."""
    os.environ.clear()
    os.environ.update(env)
    _FORKED["sweep_watch"] = True
    _FORKED["lock_fds"] = lock_fds


def resolve_device(bench_device: str) -> str:
    import torch

    if bench_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if bench_device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench.device is cuda but torch sees no CUDA device")
    return bench_device


def device_map_for(device: str, num_gpus: int) -> Any:
    if device == "cpu":
        return {"": "cpu"}
    return {"": 0} if num_gpus == 1 else "auto"  # "auto" spreads layers over every visible GPU


# torch's own default for the CUDA caching allocator, spelled out
TORCH_DEFAULT_ALLOC_CONF = "expandable_segments:False"


def pin_allocator_config() -> None:
    """Every cell measures under the same CUDA caching allocator: the user's setting if any, else torch's
    default, written out in PYTORCH_ALLOC_CONF. GPT-QModel 7.6 sets its own on import (expandable segments,
    max_split_size_mb 256, a garbage-collection threshold of 0.7) whenever PYTORCH_ALLOC_CONF is empty, even
    where the user set the older PYTORCH_CUDA_ALLOC_CONF: gptq and awq cells would otherwise reserve and fragment
    memory under another allocator than every other method's, and their peaks and timings would not compare.
    A user's PYTORCH_CUDA_ALLOC_CONF alone is copied under the primary name. Before any CUDA use."""
    if not os.environ.get("PYTORCH_ALLOC_CONF"):
        os.environ["PYTORCH_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or TORCH_DEFAULT_ALLOC_CONF


def run(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The cell, start to end: a result dict that is ``ok`` with its metrics or ``error`` with the phase it failed
    in and every metric measured before (failures are data)."""
    from omegaconf import OmegaConf

    from qbench import methods
    from qbench.measure.budget import CellClock
    from qbench.measure.cpu_affinity import apply_cpu_affinity
    from qbench.store.jsonio import now_iso
    from qbench.store.rows import error_message

    # every second of the cell, from the parent's spawn when it says when (timings.budget)
    clock = CellClock(spec.get("spawned_at_unix"), FIRST_LINE if spec.get("spawned_at_unix") else None)
    clock.lap("startup_s")  # first line → here: logging, the spec, the device registry (main)
    cfg = OmegaConf.create(spec["config"])
    # First, before torch is imported (environment() imports it): threads inherit the affinity of their parent
    affinity, affinity_warning = apply_cpu_affinity(cfg.bench.get("cpu_affinity"), int(cfg.model.num_gpus))
    # torch.compile's on-disk caches (Inductor's FX graph and autotune caches) in qbench's cache, not in /tmp: a
    # later cell with the same shapes and dtype (another round, a rerun, bench-check) loads the compiled decode
    # step instead of compiling it again, a fraction of the cold cost (docs/latency.md#what-the-defaults-cost)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg.run.cache_dir).expanduser().resolve() / "torch_compile"))
    pin_allocator_config()
    clock.lap("setup_s")
    _import_libraries(cfg)
    if _FORKED["sweep_watch"]:
        _size_thread_pools()
    clock.lap("imports_s")
    result = _new_result(cfg, spec, affinity, affinity_warning)
    if _FORKED["sweep_watch"]:  # imports_s is near 0: the server paid them once for the sweep (server_s)
        result["preload"] = {"preloaded": True, "server_s": spec.get("preload_server_s")}
    where = {"phase": "setup"}
    try:
        method = methods.get(cfg.method.kind)
        device = resolve_device(cfg.bench.device)
        clock.lap("setup_s")
        _cuda_context(device)
        clock.lap("cuda_context_s")
        source = _resolve(cfg, device, result, where)
        clock.lap("resolve_s")
        model, tokenizer, phases = _load(cfg, method, source, device, result, where)
        clock.lap("load_s")
        clock.split("load_s", _load_parts(result["timings"]))
        if cfg.run.inject_failure:
            _inject(cfg.run.inject_failure, cfg.method.name)
        footprint = _memory(model, method, cfg, result, where)
        clock.lap("memory_s")
        if cfg.bench.enabled:
            _latency(model, tokenizer, method, cfg, device, phases, footprint, result, where, clock)
        if cfg.eval.enabled:
            _accuracy(model, tokenizer, cfg, device, phases, result, where, clock)
        if cfg.eval.enabled and cfg.eval.quality.enabled:
            where["phase"] = "quality"
            t0 = time.perf_counter()
            with phases.phase("quality"):
                result["metrics"]["quality"] = _quality(model, tokenizer, cfg, spec)
            result["warnings"].extend(result["metrics"]["quality"].pop("warnings"))
            result["timings"]["quality_s"] = time.perf_counter() - t0
            clock.lap("quality_s")
            parts = result["metrics"]["quality"].pop("time_parts_s")
            clock.split("quality_s", {f"quality_{k}": v for k, v in parts.items()}, rest="quality_other_s")
        result["metrics"]["memory"].update(phases.summary())
        result["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # failures are data
        raise_if_stopped(exc)
        clock.lap(f"{where['phase']}_s")  # the seconds of the step that failed, under its name
        result["error"] = {
            "class": classify(exc),
            "type": type(exc).__name__,
            "message": error_message(exc),  # the cause in one line; the whole text is in the traceback
            "traceback": traceback.format_exc()[-20000:],
            "phase": where["phase"],
        }
        log.error("cell failed in %s: %s: %s", where["phase"], type(exc).__name__, result["error"]["message"])
    clock.lap("finish_s")
    result["finished_at"] = now_iso()
    result["wall_time_s"] = clock.wall_s()
    _close_budget(result, clock)
    return result


def _import_libraries(cfg: Any) -> None:
    """The libraries every cell of this kind imports, imported here so that their seconds are timings.budget's
    imports_s rather than hidden in the first step that needs them. After the CPU affinity and the allocator
    setting (qbench/run/cell.py's run), before any CUDA use. A method library that is missing fails where the method
    loads, with its own message."""
    import importlib

    from qbench import methods

    names = ["torch", "transformers"]
    if cfg.eval.enabled:
        names += ["lm_eval.evaluator", "lm_eval.models.huggingface"]
    with contextlib.suppress(Exception):
        names += list(methods.libraries(methods.get(cfg.method.kind)))
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _cuda_context(device: str) -> None:
    """Create the CUDA context of every visible GPU now (timings.budget.cuda_context_s) rather than inside the
    load. A synchronize creates the context without the caching allocator, so no phase's allocator peak moves,
    and the context exists at the load's end either way (its NVML figure does not move)."""
    if device != "cuda":
        return
    import torch

    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def _load_parts(timings: Dict[str, Any]) -> Dict[str, Any]:
    """What the load spent on quantizing now (not on a quantized-checkpoint cache hit, whose quantize_s is the
    original cost) and on building kernels, as the method reported them."""
    spent_now = timings.get("quantize_s") if not timings.get("quantize_cache_hit") else None
    return {"quantize_s": spent_now, "kernel_compile_s": timings.get("kernel_compile_s"),
            "quantize_other_s": timings.get("quantize_other_s")}


def _close_budget(result: Dict[str, Any], clock: Any) -> None:
    """timings.budget (its parts add up to wall_time_s) and overhead_s (wall less the measuring parts)."""
    from qbench.measure.budget import overhead_s

    budget = clock.budget(result["wall_time_s"])
    result["timings"]["budget"] = budget
    result["timings"]["overhead_s"] = overhead_s(budget, result["wall_time_s"])


def _new_result(cfg: Any, spec: Dict[str, Any], affinity: Any, affinity_warning: Any) -> Dict[str, Any]:
    """The result as it stands before anything is measured: what the cell is and where it runs."""
    from qbench import methods
    from qbench.run import slurm
    from qbench.store.environment import environment
    from qbench.store.identity import identity
    from qbench.store.jsonio import now_iso
    from qbench.store.layout import cell_id
    from qbench.store.result import SCHEMA_VERSION

    if affinity_warning:
        log.warning(affinity_warning)
    return {
        "schema_version": SCHEMA_VERSION,
        "attempt_id": spec.get("attempt_id"),
        "status": "error",
        "sweep": cfg.run.sweep,
        "cell": cell_id(cfg),
        "round": cfg.run.get("round"),
        "model": cfg.model.name,
        "method": cfg.method.name,
        "method_kind": cfg.method.kind,
        "random_weights": bool(cfg.model.random_init or cfg.model.source.startswith("builtin:")),
        "started_at": now_iso(),
        "pid": os.getpid(),  # each cell runs in a process of its own
        "config": spec["config"],
        "identity": identity(spec["config"]),  # the settings that change its figures: skip-if-done compares them
        "overrides": spec.get("overrides", []),
        "command": spec.get("command", ""),
        "environment": {**environment(methods.libraries(methods.get(cfg.method.kind))), "cpu_affinity": affinity,
                        "torch_compile_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")},
        "scheduler": slurm.job_info(),  # SLURM job id, node, array index; null outside SLURM
        "timings": {},
        "metrics": {},
        "warnings": [affinity_warning] if affinity_warning else [],
        "error": None,
    }


def _resolve(cfg: Any, device: str, result: Dict[str, Any], where: Dict[str, str]) -> Any:
    """The model's source as a local folder (built, converted or downloaded once into the cache)."""
    import torch

    from qbench.load import models

    result["device"] = device
    result["gpus_used"] = list(range(torch.cuda.device_count())) if device == "cuda" else []
    where["phase"] = "resolve"
    t0 = time.perf_counter()
    source = models.resolve(cfg.model, cfg.run.cache_dir, device=device)
    source.info["cache_dir"] = str(Path(cfg.run.cache_dir).expanduser())
    result["timings"]["resolve_s"] = time.perf_counter() - t0
    result["source"] = {
        "path": source.path,
        "revision": source.revision,
        "trust_remote_code": source.trust_remote_code,
        "random_weights": source.random_weights,
        **{k: v for k, v in source.info.items() if k != "cache_dir"},
    }
    result["random_weights"] = source.random_weights
    log.info("cell %s: weights from %s: %s", result["cell"], source.path,
             "RANDOM (random_init or builtin:tiny): accuracy and quality figures sit at chance"
             if source.random_weights else "real")
    return source


def _load(cfg: Any, method: Any, source: Any, device: str, result: Dict[str, Any], where: Dict[str, str]) -> tuple:
    """(model, tokenizer, phase memory) with the method applied; its one-time costs go into timings."""
    from qbench.errors import ConfigError
    from qbench.load import models
    from qbench.measure import memory
    from qbench.run.preflight import tokenizer_fit_problem

    where["phase"] = "load"
    timings = result["timings"]
    phases = memory.PhaseMemory(device)
    with phases.phase("load"):
        t0 = time.perf_counter()
        model, method_info = method.load(source, cfg.method, device_map_for(device, int(cfg.model.num_gpus)))
        timings["load_s"] = time.perf_counter() - t0
    model.eval()
    tokenizer = models.load_tokenizer(source)
    # preflight checked what was on disk; a Hub model's tokenizer and config are checked here, loaded
    problem = tokenizer_fit_problem(len(tokenizer), model.get_input_embeddings().num_embeddings,
                                    f"'{source.tokenizer_path}'")
    if problem:
        raise ConfigError(problem)
    result["method_info"] = method_info
    # One-time costs apart from the load itself: quantization (the original cost, also on a cache hit)
    # and kernel JIT builds; load_s is the wall time of the whole load, these say what it contained.
    timings["quantize_s"] = method_info.get("quantize_s")
    timings["quantize_cache_hit"] = method_info.get("cache_hit")
    timings["kernel_compile_s"] = method_info.get("kernel_compile_s")
    timings["quantize_other_s"] = method_info.get("quantize_other_s")
    timings["load_excluding_quantize_s"] = method_info.get("load_s_excluding_quantize")
    if device == "cuda" and hasattr(model, "hf_device_map"):
        result["device_map"] = {k: str(v) for k, v in model.hf_device_map.items()}
    return model, tokenizer, phases


def _memory(model: Any, method: Any, cfg: Any, result: Dict[str, Any], where: Dict[str, str]) -> Dict[str, Any]:
    """Weights measured and analytic (metrics.memory); returns the measured footprint."""
    from qbench.measure import memory

    where["phase"] = "memory"
    if hasattr(method, "measure_memory"):  # a model that runs outside torch (gguf: llama.cpp) measures itself
        result["metrics"]["memory"] = method.measure_memory(model, cfg.method)
        return result["metrics"]["memory"]
    footprint = memory.weight_footprint(model, method)
    analytic = memory.analytic_weights(model.config, method, cfg.method)
    mem = result["metrics"]["memory"] = {**footprint, **analytic, **memory.quantized_share(model, method)}
    measured, expected = footprint.get("weight_bytes_measured"), analytic.get("weight_bytes_analytic")
    mem["weight_measured_over_analytic"] = measured / expected if measured and expected else None
    for warning in memory.memory_warnings(mem, memory.method_quantizes(method, cfg.method)):
        log.warning(warning)
        result["warnings"].append(warning)
    return footprint


def _latency(model: Any, tokenizer: Any, method: Any, cfg: Any, device: str, phases: Any, footprint: Dict[str, Any],
             result: Dict[str, Any], where: Dict[str, str], clock: Any) -> None:
    from qbench.measure import latency, timing

    where["phase"] = "latency"
    t0 = time.perf_counter()
    with timing.collect() as spent:
        lat = getattr(method, "measure_latency", latency.measure)(  # gguf: llama.cpp's own loop
            model, tokenizer, cfg.bench, device, phases,
            footprint["weight_bytes_read_per_token"],  # the untied input embedding is read a row at a time
            model.config,
            compute_dtype=getattr(method, "COMPUTE_DTYPE", None),
        )
    result["timings"]["latency_s"] = time.perf_counter() - t0
    clock.lap("latency_s")
    # the compiles (torch.compile's first calls, graph recording), the discarded warm-ups, the timed runs; the
    # rest is the phase's own work (prompts, the copy-bandwidth check, the KV-cache figures)
    clock.split("latency_s", {"latency_compile_s": spent.bounded_s, "latency_warmup_s": spent.warmup_s,
                              "latency_timed_s": spent.timed_s}, rest="latency_other_s")
    result["warnings"].extend(lat.pop("warnings", []))
    result["metrics"]["memory"]["kv_cache_bytes_analytic"] = lat.pop("kv_cache_bytes_analytic", None)
    result["metrics"]["latency"] = lat


def _accuracy(model: Any, tokenizer: Any, cfg: Any, device: str, phases: Any, result: Dict[str, Any],
              where: Dict[str, str], clock: Any) -> None:
    from qbench import methods
    from qbench.evaluate import accuracy

    where["phase"] = "eval"
    unsupported = getattr(methods.get(cfg.method.kind), "ACCURACY_UNSUPPORTED", None)
    if unsupported:  # no lm-eval adapter fits the method's runtime (gguf: llama.cpp): the result says why
        result["warnings"].append(unsupported)
        return
    t0 = time.perf_counter()
    with phases.phase("eval"):
        result["metrics"]["accuracy"] = accuracy.run(model, tokenizer, cfg.eval, device, result["random_weights"],
                                                     cache_dir=cfg.run.cache_dir,  # gguf: its own lm-eval model
                                                     make_lm=getattr(methods.get(cfg.method.kind), "lm_eval_model",
                                                                     None))
    result["warnings"].extend((result["metrics"]["accuracy"] or {}).get("warnings", []))
    result["timings"]["eval_s"] = time.perf_counter() - t0
    clock.lap("eval_s")
    spent = (result["metrics"]["accuracy"] or {}).pop("time_budget", {})
    result["timings"]["eval_request_cache"] = spent.get("request_cache")
    result["timings"]["eval_model_calls"] = spent.get("model_calls") or None
    clock.split("eval_s", {"eval_tasks_s": spent.get("tasks_s"), "eval_requests_s": spent.get("requests_s"),
                           "eval_model_calls_s": spent.get("model_calls_s"),
                           "eval_perplexity_s": spent.get("perplexity_s")}, rest="eval_other_s")


def _quality(model: Any, tokenizer: Any, cfg: Any, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Quality against the sweep's baseline cell of this model (qbench/evaluate/quality.py)."""
    from omegaconf import OmegaConf

    from qbench.errors import eval_offline
    from qbench.evaluate import quality
    from qbench.evaluate.perplexity import load_perplexity_text
    from qbench.store.identity import content_hash
    from qbench.store.layout import cell_dir as cell_dir_of

    q = cfg.eval.quality
    base = cfg.run.baseline_method
    baseline_file = None if cfg.method.name == base else cell_dir_of(cfg, base) / quality.LOGPROBS_FILE
    meta = {"source": q.source, "model": cfg.model.name, "method": cfg.method.name,
            "model_config_hash": content_hash(OmegaConf.to_container(cfg.model, resolve=True))}
    t0 = time.perf_counter()
    text = load_perplexity_text(q.source, offline=eval_offline(cfg.eval))
    text_s = time.perf_counter() - t0
    cell_dir = Path(spec.get("cell_dir") or cell_dir_of(cfg))
    section = quality.run(model, tokenizer, q, text=text, cell_dir=cell_dir, baseline_file=baseline_file, meta=meta)
    section["time_parts_s"]["text_s"] += text_s
    section["baseline_method"] = base
    if section["comparison"]:
        kl = section["comparison"]["kl_divergence"]
        log.info("quality vs %s: KL %.5f nats/token, top-1 agreement %.2f %%, ppl %.3f (baseline %.3f)", base,
                 kl["mean"], section["comparison"]["top1_agreement_pct"]["mean"], section["ppl"],
                 section["comparison"]["ppl_baseline"])
    else:
        log.info("quality: ppl %.3f; %s", section["ppl"], "this is the baseline" if baseline_file is None
                 else f"no {base} file yet: the report compares when both exist")
    return section


def _inject(spec: str, method_name: str) -> None:
    import torch

    kind, _, only = spec.partition(":")
    if only and only != method_name:
        return
    if kind == "oom":
        raise torch.OutOfMemoryError("injected by run.inject_failure=oom")
    raise RuntimeError("injected by run.inject_failure=exception")


class OncePerCell(logging.Filter):
    """Lets each distinct library warning (logging, WARNING and up) through once per cell and counts the repeats.

    bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16" on every int8 matmul
    (tens of thousands of lines for one CPU cell); what the sweep's log needs is the message once, and what the
    result needs is that it happened: ``warnings()`` lists each with its count for result["warnings"].
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: Dict[tuple, list] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.split(".")[0] == "qbench":
            return True
        key = (record.name, str(record.msg), record.args if isinstance(record.args, tuple) else None)
        if key in self.seen:
            self.seen[key][0] += 1
            return False
        self.seen[key] = [1, record.name.split(".")[0], record.getMessage()]
        return True

    def records(self) -> list:
        """Every distinct library warning of the cell with its count (result["library_warnings"])."""
        return [{"library": lib, "message": text, "count": n} for n, lib, text in self.seen.values()]

    def warnings(self) -> list:
        """The repeated ones, for result["warnings"]: a warning logged again and again comes from the code
        being measured (a cast on every matmul), not from an import; one-off import chatter stays out, and so
        does what lm-eval says of every loaded model qbench hands it (accuracy.EXPECTED_LIBRARY_WARNINGS)."""
        from qbench.evaluate.accuracy import EXPECTED_LIBRARY_WARNINGS

        def expected(lib: str, text: str) -> bool:
            return any(lib == name and text.startswith(start) for name, start in EXPECTED_LIBRARY_WARNINGS)

        return [f"{lib}: {text} (logged {n} times, shown once)" for n, lib, text in self.seen.values()
                if n > 1 and not expected(lib, text)]

    @classmethod
    def install(cls) -> OncePerCell:
        """On every handler of the root logger, where library loggers' records end up."""
        f = cls()
        for handler in logging.getLogger().handlers:
            handler.addFilter(f)
        return f


EXIT_UNWRITTEN = 74  # sysexits EX_IOERR: the cell ended but its result.json could not be written (disk full, ...)


def _log_to_file(cell_dir: Path, log_format: str) -> Optional[logging.Handler]:
    """The cell's own log beside its result, appended to by every attempt: where a cell that was stopped before
    it wrote a result (a time limit, a compile that did not end) spent its time, figure by figure. None where
    it cannot be opened (the disk is full, the path is not a folder): the cell still runs and says so."""
    from qbench.store.layout import CELL_LOG

    try:
        handler = logging.FileHandler(cell_dir / CELL_LOG, encoding="utf-8")
    except OSError as exc:
        log.error("%s: cannot write the cell log (%s); logging to the console only", cell_dir / CELL_LOG, exc)
        return None
    handler.setFormatter(logging.Formatter(log_format))
    logging.getLogger().addHandler(handler)
    return handler


def _traceback_to_file(message: str, handler: Optional[logging.Handler]) -> None:
    """One line on the console; the traceback in cell.log only (where there is one)."""
    log.error(message)
    if handler is not None:
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, traceback.format_exc(), None, None))


def mark_contaminated(result: Dict[str, Any]) -> None:
    """A result measured while another measuring process used the same device is not ``ok``: its timings and peaks
    are those of a shared device (runs of the same cell measured side by side showed CVs of 71-75 %). It becomes
    an error of class ``contaminated`` that keeps every figure (the report shows them, marked), is counted as
    failed, and is measured again by ``run.rerun_failed=true``. Only a known overlap counts: where the registry
    could not be written (shared is null) the result stays as it is, with the registry's error recorded."""
    shared = result.get("device_shared") or {}
    if not shared.get("shared"):
        return
    others = ", ".join(shared.get("other_measuring_processes") or []) or "unknown"
    if not str(result.get("device") or "").startswith("cuda"):
        # CPU cells side by side are the parallel and SLURM launchers' documented choice (CPU cells share one
        # slot): their timings are shared, and the warning says so; their memory and quality are their own
        result["warnings"].append(f"another measuring process used this host's CPUs meanwhile ({others}): its "
                                  "timings are not this method's alone")
        return
    message = (f"another measuring process used this cell's device meanwhile ({others}): its timings and peaks "
               "are not this method's alone; rerun with run.rerun_failed=true")
    if result.get("status") == "ok":
        result["status"] = "error"
        result["error"] = {"class": "contaminated", "type": "contaminated", "message": message, "traceback": "",
                           "phase": "device"}
    result["warnings"].append(message)


def main(argv: list[str] | None = None) -> int:
    from qbench.measure.gpu_state import DeviceWatch
    from qbench.store.jsonio import write_result
    from qbench.store.result import ResultTypeError

    logging.raiseExceptions = False  # a log line the disk refuses is dropped, not printed as a traceback
    argv = sys.argv[1:] if argv is None else argv
    spec_path = Path(argv[0])
    cell_dir = spec_path.parent.parent
    log_format = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    to_file = None
    install_stop_handlers()
    try:
        to_file = _log_to_file(cell_dir, log_format)
        spec = json.loads(spec_path.read_text())
        die_with_parent(spec.get("parent_pid"))
        log.info("attempt %s, pid %d", spec.get("attempt_id"), os.getpid())
        once = OncePerCell.install()
        # SLURM sends SIGUSR2 to every process of a job signal_delay_s before its time limit (submitit's --signal),
        # and SIGUSR2 ends a Python process by default: the cell would die 90 s early as a "crash". It measures
        # on; at the limit SLURM stops it and the row says timeout.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        spec.setdefault("cell_dir", str(cell_dir))  # where the cell keeps files beside its result (quality)
        # Registered as measuring on its devices for the whole cell: the result says whether another measuring
        # process (another sweep, another user, another lock folder) overlapped with it there.
        with DeviceWatch(spec.get("device_keys") or []) as watch:
            result = run(spec)
            result["device_shared"] = watch.report()
        raise_if_stopped()  # a stop some library swallowed: the cell is not finished, whatever it returned
        mark_contaminated(result)
        result["library_warnings"] = once.records()
        result["warnings"].extend(once.warnings())
    except Stopped as exc:
        log.warning("interrupted: no result written, the next run redoes this cell (%s)", signal.Signals(exc.signum).name)
        # ended by the same signal, so the parent (or SLURM) reads how the cell ended
        signal.signal(exc.signum, signal.SIG_DFL)
        os.kill(os.getpid(), exc.signum)
        return signal_exit_status(exc.signum)
    except KeyboardInterrupt:
        log.warning("interrupted: no result written, the next run redoes this cell")
        return 130
    except Exception as exc:  # outside run(): the spec, the device registry; its traceback goes to cell.log
        _traceback_to_file(f"cell process failed: {type(exc).__name__}: {exc}", to_file)
        return 1
    try:
        write_result(cell_dir, result)
    except ResultTypeError as exc:  # a qbench bug: refused before it reaches disk; the sweep records a crash
        _traceback_to_file(f"{cell_dir / 'result.json'}: result refused: {exc}", to_file)
        return 1
    except OSError as exc:
        _traceback_to_file(f"{cell_dir / 'result.json'}: result not written: {exc}", to_file)
        return EXIT_UNWRITTEN
    return 0


if __name__ == "__main__":
    sys.exit(main())
