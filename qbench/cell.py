"""One cell, in its own process: load → quantize → measure (memory, latency, accuracy) → store.

Started by qbench.cli.run_cell as ``python -m qbench.cell <spec.json>``. Whatever happens, the cell ends in a
result.json: ``ok`` with its metrics, or ``error`` with the error class, message, traceback and the phase it
failed in, plus every metric measured before the failure. The one exception is Ctrl-C: an interrupted cell
writes nothing, so that the next run of the sweep redoes it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict

log = logging.getLogger("qbench.cell")
CELL_LOG = "cell.log"  # the cell process's log, beside result.json


def classify(exc: BaseException) -> str:
    """Error class stored in the result: oom | config | exception."""
    from qbench.config import ConfigError

    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return "oom"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, ConfigError):
        return "config"
    return "exception"


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
    from qbench.measure.cpu_affinity import apply_cpu_affinity
    from qbench.store import error_message, now_iso

    cfg = OmegaConf.create(spec["config"])
    # First, before torch is imported (environment() imports it): threads inherit the affinity of their parent
    affinity, affinity_warning = apply_cpu_affinity(cfg.bench.get("cpu_affinity"), int(cfg.model.num_gpus))
    # torch.compile's on-disk caches (Inductor's FX graph and autotune caches) in qbench's cache, not in /tmp: a
    # later cell with the same shapes and dtype (another round, a rerun, bench-check) loads the compiled decode
    # step instead of compiling it again (H200, 8B: 34 s at batch 1, 41 s for the batch-dynamic graph; warm 9 + 10 s)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg.run.cache_dir).expanduser().resolve() / "torch_compile"))
    pin_allocator_config()
    t_start = time.perf_counter()
    result = _new_result(cfg, spec, affinity, affinity_warning)
    where = {"phase": "setup"}
    try:
        method = methods.get(cfg.method.kind)
        device = resolve_device(cfg.bench.device)
        source = _resolve(cfg, device, result, where)
        model, tokenizer, phases = _load(cfg, method, source, device, result, where)
        if cfg.run.inject_failure:
            _inject(cfg.run.inject_failure, cfg.method.name)
        footprint = _memory(model, method, cfg, result, where)
        if cfg.bench.enabled:
            _latency(model, tokenizer, method, cfg, device, phases, footprint, result, where)
        if cfg.eval.enabled:
            _accuracy(model, tokenizer, cfg, device, phases, result, where)
        if cfg.eval.enabled and cfg.eval.quality.enabled:
            where["phase"] = "quality"
            t0 = time.perf_counter()
            with phases.phase("quality"):
                result["metrics"]["quality"] = _quality(model, tokenizer, cfg, spec)
            result["warnings"].extend(result["metrics"]["quality"].pop("warnings"))
            result["timings"]["quality_s"] = time.perf_counter() - t0
        result["metrics"]["memory"].update(phases.summary())
        result["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # failures are data
        result["error"] = {
            "class": classify(exc),
            "type": type(exc).__name__,
            "message": error_message(exc),  # the cause in one line; the whole text is in the traceback
            "traceback": traceback.format_exc()[-20000:],
            "phase": where["phase"],
        }
        log.error("cell failed in %s: %s: %s", where["phase"], type(exc).__name__, result["error"]["message"])
    result["finished_at"] = now_iso()
    result["wall_time_s"] = time.perf_counter() - t_start
    return result


def _new_result(cfg: Any, spec: Dict[str, Any], affinity: Any, affinity_warning: Any) -> Dict[str, Any]:
    """The result as it stands before anything is measured: what the cell is and where it runs."""
    from qbench import methods, slurm
    from qbench.store import SCHEMA_VERSION, cell_id, environment, now_iso

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

    from qbench import models

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
    from qbench import models
    from qbench.errors import ConfigError
    from qbench.measure import memory
    from qbench.preflight import tokenizer_fit_problem

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
             result: Dict[str, Any], where: Dict[str, str]) -> None:
    from qbench.measure import latency

    where["phase"] = "latency"
    t0 = time.perf_counter()
    lat = getattr(method, "measure_latency", latency.measure)(  # gguf: llama.cpp's own loop
        model, tokenizer, cfg.bench, device, phases,
        footprint["weight_bytes_read_per_token"],  # the untied input embedding is read a row at a time
        model.config,
        compute_dtype=getattr(method, "COMPUTE_DTYPE", None),
    )
    result["timings"]["latency_s"] = time.perf_counter() - t0
    result["warnings"].extend(lat.pop("warnings", []))
    result["metrics"]["memory"]["kv_cache_bytes_analytic"] = lat.pop("kv_cache_bytes_analytic", None)
    result["metrics"]["latency"] = lat


def _accuracy(model: Any, tokenizer: Any, cfg: Any, device: str, phases: Any, result: Dict[str, Any],
              where: Dict[str, str]) -> None:
    from qbench import methods
    from qbench.evaluate import accuracy

    where["phase"] = "eval"
    unsupported = getattr(methods.get(cfg.method.kind), "ACCURACY_UNSUPPORTED", None)
    if unsupported:  # no lm-eval adapter fits the method's runtime (gguf: llama.cpp): the result says why
        result["warnings"].append(unsupported)
        return
    t0 = time.perf_counter()
    with phases.phase("eval"):
        result["metrics"]["accuracy"] = accuracy.run(model, tokenizer, cfg.eval, device, result["random_weights"])
    result["warnings"].extend((result["metrics"]["accuracy"] or {}).get("warnings", []))
    result["timings"]["eval_s"] = time.perf_counter() - t0


def _quality(model: Any, tokenizer: Any, cfg: Any, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Quality against the sweep's baseline cell of this model (qbench/evaluate/quality.py)."""
    from omegaconf import OmegaConf

    from qbench.store import cell_dir as cell_dir_of
    from qbench.config import eval_offline
    from qbench.evaluate import quality
    from qbench.evaluate.perplexity import load_perplexity_text
    from qbench.store import content_hash

    q = cfg.eval.quality
    base = cfg.run.baseline_method
    baseline_file = None if cfg.method.name == base else cell_dir_of(cfg, base) / quality.LOGPROBS_FILE
    meta = {"source": q.source, "model": cfg.model.name, "method": cfg.method.name,
            "model_config_hash": content_hash(OmegaConf.to_container(cfg.model, resolve=True))}
    text = load_perplexity_text(q.source, offline=eval_offline(cfg.eval))
    cell_dir = Path(spec.get("cell_dir") or cell_dir_of(cfg))
    section = quality.run(model, tokenizer, q, text=text, cell_dir=cell_dir, baseline_file=baseline_file, meta=meta)
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
        being measured (a cast on every matmul), not from an import; one-off import chatter stays out."""
        return [f"{lib}: {text} (logged {n} times, shown once)" for n, lib, text in self.seen.values() if n > 1]

    @classmethod
    def install(cls) -> "OncePerCell":
        """On every handler of the root logger, where library loggers' records end up."""
        f = cls()
        for handler in logging.getLogger().handlers:
            handler.addFilter(f)
        return f


def main(argv: list[str] | None = None) -> int:
    from qbench.measure.gpu_state import DeviceWatch
    from qbench.store import write_result

    argv = sys.argv[1:] if argv is None else argv
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    cell_dir = spec_path.parent.parent
    log_format = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    # the cell's own log beside its result, appended to by every attempt: where a cell that was stopped before
    # it wrote a result (a time limit, a compile that did not end) spent its time, figure by figure
    to_file = logging.FileHandler(cell_dir / CELL_LOG, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(log_format))
    logging.getLogger().addHandler(to_file)
    log.info("attempt %s, pid %d", spec.get("attempt_id"), os.getpid())
    once = OncePerCell.install()
    # SLURM sends SIGUSR2 to every process of a job signal_delay_s before its time limit (submitit's --signal),
    # and SIGUSR2 ends a Python process by default: the cell would die 90 s early as a "crash". It measures on;
    # at the limit SLURM stops it and the row says timeout.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    spec.setdefault("cell_dir", str(cell_dir))  # where the cell keeps files beside its result (quality)
    # Registered as measuring on its devices for the whole cell: the result says whether another measuring
    # process (another sweep, another user, another lock folder) overlapped with it there.
    with DeviceWatch(spec.get("device_keys") or []) as watch:
        try:
            result = run(spec)
        except KeyboardInterrupt:
            log.warning("interrupted: no result written, the next run redoes this cell")
            return 130
        result["device_shared"] = watch.report()
    if result["device_shared"]["shared"]:
        result["warnings"].append(
            "another measuring process used this cell's device meanwhile ("
            + ", ".join(result["device_shared"]["other_measuring_processes"]) + "): timings and peaks may be off")
    result["library_warnings"] = once.records()
    result["warnings"].extend(once.warnings())
    write_result(cell_dir, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
