"""GPT-QModel's shared plumbing: what GPTQ (qbench/methods/gptq.py) and AWQ (awq.py) do alike.

A method module built on it defines its Config and the few things that differ: BITS, GROUP_SIZES and BACKENDS
(short kernel names), MARLIN_NEEDS_SYM, TRITON_BITS, ``validate_own(cfg)``, ``own_weight_settings(cfg)``,
``quantize_config(cfg, common_kwargs, device_type)`` (the GPT-QModel QuantizeConfig) and its packed layout's bytes.

1. ``validate``: bits, group size, dtype, kernel name, calibration, checkpoint (+ the method's own keys).
2. ``load``: the quantized checkpoint comes from ``method.checkpoint`` (a pre-quantized Hub id or local dir)
   or from the qbench cache (qbench/load/quant_cache.py), where a cache miss quantizes in a *child process*:
   ``GPTQModel.load(src, GPTQConfig | AWQConfig).quantize(calibration).save(tmp)``. The child keeps the
   quantization's memory and time out of the cell (its CUDA peak, RSS peak and wall time are recorded in the
   checkpoint's metadata instead), and a crash there becomes a clean exception here.
   The checkpoint is then loaded in this process with ``GPTQModel.load(dir, backend=...)``; the HF model
   (``.model``) is returned, and the quantized linears are counted by kernel class.

Kernels (``method.backend``): ``auto`` resolves here, not in GPT-QModel, because GPT-QModel's own auto-order
on Hopper tries Machete first, whose JIT build downloads CUTLASS (fails offline, may hang on a firewall).
qbench's ``auto``: CUDA -> Marlin when the config fits it (4/8-bit, group -1/32/64/128; GPTQ also sym),
else Triton / torch; CPU -> the torch kernel (packed int32 layout kept as in the checkpoint).
JIT-compiled kernels (Marlin, ExLlamaV2, Machete, AWQ GEMM, CPU packing) are built before the timed load
and their time is recorded as ``kernel_compile_s``; their build cache lives under ``<cache_dir>/torch_extensions``
(``GPTQMODEL_TORCH_EXTENSIONS_DIR`` / ``TORCH_EXTENSIONS_DIR``, unless already set), so it persists across cells.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

EXTRA = "gptq"
LIBRARIES = ("gptqmodel", "optimum")
# what a quantized checkpoint depends on (part of the cache key)
KEY_LIBRARIES = ("gptqmodel", "transformers", "torch")

# JIT-built extension behind a kernel (gptqmodel.extension names); None: nothing to compile ahead.
_EXTENSIONS = {
    "gptq_marlin": "marlin", "awq_marlin": "marlin", "gptq_exllama_v2": "exllamav2",
    "awq_exllama_v2": "exllamav2_awq", "gptq_machete": "machete", "awq_machete": "machete",
    "awq_gemm": "awq", "awq_gemv": "awq", "awq_gemv_fast": "awq", "gptq_swordfish": "swordfish",
    "awq_swordfish": "swordfish",
}
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)


def method(kind: str) -> ModuleType:
    """The method module of ``kind`` (gptq, awq): what differs between the GPT-QModel methods."""
    return importlib.import_module(f"qbench.methods.{kind}")


def is_quantized_module(module: Any) -> bool:
    """GPT-QModel's quantized linears keep ``qweight`` as a buffer (or a parameter, in some kernels)."""
    return "qweight" in module._buffers or "qweight" in module._parameters


def versions() -> Dict[str, Optional[str]]:
    from qbench.store.environment import package_versions

    return package_versions(KEY_LIBRARIES)


# ---------------------------------------------------------------------------------------------------------
# validate


def bits_of(cfg: Any) -> int:
    return 4 if cfg.bits is None else int(cfg.bits)


def validate_common(cfg: Any, kind: str) -> None:
    from qbench.errors import ConfigError, hub_offline
    from qbench.load import calibration

    own = method(kind)
    bits = bits_of(cfg)
    if bits not in own.BITS:
        raise ConfigError(f"method.bits: {bits} is not supported by {kind} ({', '.join(map(str, own.BITS))})")
    gs = int(cfg.group_size)
    if gs != -1 and gs <= 0:
        raise ConfigError(f"method.group_size: {gs} must be -1 (one group per output row) or positive")
    if gs not in own.GROUP_SIZES:
        raise ConfigError(
            f"method.group_size: {gs} has no GPT-QModel {kind} kernel; use one of "
            f"{', '.join(map(str, own.GROUP_SIZES))}"
        )
    if cfg.dtype not in ("float16", "bfloat16"):
        raise ConfigError(
            f"method.dtype: '{cfg.dtype}' is not supported by {kind} (float16, bfloat16): GPT-QModel kernels compute in 16-bit"
        )
    own.validate_own(cfg)
    resolve_backend_name(cfg.backend, kind)  # raises ConfigError naming method.backend
    if cfg.checkpoint:
        p = Path(cfg.checkpoint).expanduser()
        if cfg.checkpoint.startswith(("/", ".", "~")) and not p.is_dir():
            raise ConfigError(f"method.checkpoint: local directory '{cfg.checkpoint}' does not exist")
        if not p.is_dir() and hub_offline():
            raise ConfigError(
                f"method.checkpoint: '{cfg.checkpoint}' is not a local directory and HF_HUB_OFFLINE is set"
            )
    else:
        calibration.validate(cfg.calibration)


def resolve_backend_name(name: str, kind: str) -> Optional[str]:
    """The GPT-QModel BACKEND value for ``method.backend`` (None for auto), or ConfigError."""
    from qbench.errors import ConfigError

    name = str(name).strip().lower()
    if name in ("auto", ""):
        return None
    short = name[len(kind) + 1 :] if name.startswith(f"{kind}_") else name
    if short.endswith(f"_{kind}"):  # GPT-QModel's legacy aliases: torch_awq, torch_fused_awq, ...
        short = short[: -len(kind) - 1]
    backends = method(kind).BACKENDS
    if short not in backends:
        raise ConfigError(
            f"method.backend: '{name}' is not a GPT-QModel {kind} kernel; use auto or one of {', '.join(backends)}"
        )
    return f"{kind}_{short}"


def auto_backend(cfg: Any, kind: str, device_type: str) -> Tuple[str, str]:
    """qbench's choice for ``backend: auto``: (BACKEND value, why). Never one that needs a download."""
    bits, gs = bits_of(cfg), int(cfg.group_size)
    if device_type != "cuda":
        return f"{kind}_torch", "cpu: GPT-QModel's torch kernel (keeps the checkpoint's packed int32 layout)"
    own = method(kind)
    marlin_ok = bits in (4, 8) and gs in MARLIN_GROUP_SIZES and (cfg.sym or not own.MARLIN_NEEDS_SYM)
    if marlin_ok:
        return f"{kind}_marlin", "cuda: Marlin (JIT-built with local nvcc; Machete skipped: it downloads CUTLASS)"
    if bits in own.TRITON_BITS and gs in own.GROUP_SIZES:
        try:
            import triton  # noqa: F401

            return f"{kind}_triton", "cuda: Triton (Marlin does not take this config)"
        except ImportError:
            pass
    return f"{kind}_torch", "cuda: torch kernel (no faster kernel takes this config)"


# ---------------------------------------------------------------------------------------------------------
# environment


# Where GPT-QModel's kernel builds go: its own torch.ops JIT extensions (Marlin, ExLlamaV2, AWQ GEMM, CPU
# packing), torch.utils.cpp_extension builds, and Triton kernels (its Triton backends; inductor's too).
KERNEL_CACHE_ENV = ("GPTQMODEL_TORCH_EXTENSIONS_DIR", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR")


def setup_env(cache_root: Path) -> Dict[str, str]:
    """Persistent kernel caches under ``<run.cache_dir>`` (unless the user set them), so that a second cell and
    the next sweep load the builds instead of compiling again; and GPT-QModel's CPU workers."""
    root = Path(cache_root).expanduser().resolve()
    ext = root / "torch_extensions"
    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(ext / "gptqmodel"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ext / "torch"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))  # default ~/.triton: lost with the machine
    # GPT-QModel's default is (cpus+1)//2 workers: 1 on a 2-core machine, where quantization stalls.
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and (os.cpu_count() or 1) <= 3:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
    return {k: os.environ[k] for k in KERNEL_CACHE_ENV}


def device_type_of(device_map: Any) -> str:
    """cuda or cpu, from the device_map the runner passes ({"": "cpu"}, {"": 0}, "auto", "cuda:0", ...)."""
    import torch

    values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    for v in values:
        if isinstance(v, int) or (isinstance(v, str) and (v.startswith("cuda") or v in ("auto", "balanced", "sequential"))):
            return "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(v, torch.device) and v.type == "cuda":
            return "cuda"
    return "cpu"


def _to_plain(obj: Any) -> Any:
    """A config (DictConfig, dataclass, namespace) as plain JSON-ready data."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, SimpleNamespace):
        return {k: _to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _ns(obj: Any) -> Any:
    if isinstance(obj, dict):
        return SimpleNamespace(**{k: _ns(v) for k, v in obj.items()})
    return obj


def weight_settings(cfg: Any, kind: str) -> Dict[str, Any]:
    """The method settings that change the quantized weights (the cache key's method part)."""
    s: Dict[str, Any] = {
        "kind": kind, "bits": bits_of(cfg), "group_size": int(cfg.group_size), "sym": bool(cfg.sym), "dtype": cfg.dtype,
    }
    s.update(method(kind).own_weight_settings(cfg))
    return s


# ---------------------------------------------------------------------------------------------------------
# load


def load_common(source: Any, cfg: Any, device_map: Any, kind: str):
    from qbench.load import calibration, quant_cache

    validate_common(cfg, kind)
    root = quant_cache.cache_root(source)
    env = setup_env(root)
    device_type = device_type_of(device_map)
    info: Dict[str, Any] = {
        "library": "gptqmodel",
        "versions": versions(),
        "method_settings": weight_settings(cfg, kind),
        "backend": str(cfg.backend),
        "kernel_cache_dirs": env,
    }

    if cfg.checkpoint:
        checkpoint = str(Path(cfg.checkpoint).expanduser()) if Path(cfg.checkpoint).expanduser().is_dir() else cfg.checkpoint
        info.update(pre_quantized=True, quantized_checkpoint=checkpoint, cache_hit=None, quantize_s=None,
                    calibration=None, quant_peak_memory_bytes=None)
    else:
        cal = calibration.describe(cfg.calibration)
        key_payload = {
            "source": quant_cache.source_fingerprint(source),
            "tokenizer": str(source.tokenizer_path),
            "method": weight_settings(cfg, kind),
            "calibration": cal,
            "quant_device": device_type,
            "versions": versions(),
        }
        key = quant_cache.cache_key(key_payload)
        spec = {"source": _to_plain(source), "method": _to_plain(cfg), "kind": kind, "device_type": device_type,
                "cache_root": str(root)}
        t_build = time.perf_counter()
        path, meta, hit = quant_cache.get_or_build(root, key, lambda tmp: quantize_checkpoint(spec, tmp))
        build_s = time.perf_counter() - t_build
        checkpoint = str(path)
        if hit:  # built before qbench restored it: an idempotent, atomic rewrite
            info["generation_config"] = restore_generation_config(source.path, source.revision, path)
        info.update(
            pre_quantized=False,
            quantized_checkpoint=checkpoint,
            cache_key=key,
            cache_hit=hit,
            quantize_s=meta.get("quantize_s"),
            quantize_timings=meta.get("timings"),
            quant_peak_memory_bytes=meta.get("quant_peak_memory_bytes"),
            quant_peak_memory_kind=meta.get("quant_peak_memory_kind"),
            quant_rss_peak_bytes=meta.get("quant_rss_peak_bytes"),
            quant_device=meta.get("quant_device"),
            quantized_at=meta.get("quantized_at"),
            quantize_versions=meta.get("versions"),
            calibration=meta.get("calibration"),
            quantize_speedups=meta.get("quantize_speedups"),
            quant_log=_quant_log_summary(path),
        )
        if not hit:
            # The quantizing child's wall time, less what it timed itself (quantize_s, its kernel builds), is its
            # start, imports, CUDA context and save: seconds that were hidden in load_s (18-23 s on an H200)
            child_kernels = (meta.get("timings") or {}).get("kernel_compile_s") or 0.0
            info["quantize_kernel_compile_s"] = child_kernels
            info["quantize_other_s"] = max(build_s - (meta.get("quantize_s") or 0.0) - child_kernels, 0.0)

    model, load_info = load_quantized(checkpoint, cfg, device_map, kind, device_type,
                                      trust_remote_code=bool(getattr(source, "trust_remote_code", False)))
    info.update(load_info)
    if info.get("quantize_kernel_compile_s"):  # every kernel build of this cell: the quantizer's and the load's
        info["load_kernel_compile_s"] = info.get("kernel_compile_s")
        info["kernel_compile_s"] = (info.get("kernel_compile_s") or 0.0) + info["quantize_kernel_compile_s"]
    return model, info


_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p")


def restore_generation_config(source_path: str, revision: Optional[str], checkpoint: Path) -> str:
    """Give a quantized checkpoint its source model's generation_config.json.

    GPT-QModel's save writes its own, with ``do_sample: true``: anyone loading the cached checkpoint would
    sample where the source model decodes greedily. The source's file is copied as it is; a source without
    one (or unreachable) gets the written file without its sampling keys, i.e. transformers' defaults.
    Returns where the file came from: "source" or "sampling keys removed".
    """
    from qbench.store.jsonio import read_json, write_json_atomic

    target = Path(checkpoint) / "generation_config.json"
    local = Path(str(source_path)).expanduser() / "generation_config.json"
    own: Optional[Dict[str, Any]] = read_json(local) if local.is_file() else None
    if own is None and not Path(str(source_path)).expanduser().exists():
        try:  # a Hub id: transformers finds it (in the local cache when offline)
            from transformers import GenerationConfig

            own = GenerationConfig.from_pretrained(source_path, revision=revision).to_diff_dict()
        except Exception:
            own = None
    how = "source"
    if own is None and not target.exists():
        return "none"
    if own is None:
        own = {k: v for k, v in (read_json(target) or {}).items() if k not in _SAMPLING_KEYS}
        how = "sampling keys removed"
    if read_json(target) != own:
        write_json_atomic(target, own)
    return how


def _quant_log_summary(path: Path) -> Optional[Dict[str, Any]]:
    """Per-module losses GPT-QModel writes (quant_log.csv): count and mean of the numeric ones."""
    import csv

    f = Path(path) / "quant_log.csv"
    if not f.exists():
        return None
    losses = []
    with open(f, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                losses.append(float(row.get("loss", "")))
            except ValueError:
                pass
    return {"file": str(f), "modules_with_loss": len(losses), "loss_mean": sum(losses) / len(losses) if losses else None}


def jit_cached(jit: Any) -> Optional[bool]:
    """Whether GPT-QModel's JIT cache already holds a built binary of ``jit`` (a TorchOpsJitExtension) for this
    torch / CUDA / source fingerprint, i.e. what its loader takes instead of compiling; None: cannot tell."""
    try:  # gptqmodel 7.6's loader: the paths it tries before building
        return any(p.is_file() for p in jit._candidate_binary_paths(jit.build_root()))
    except Exception:
        return None


def kernel_cached(ext: str) -> Optional[bool]:
    """:func:`jit_cached` for an extension named as ``gptqmodel.extension`` names them (marlin_bf16, ...)."""
    try:
        from gptqmodel import extension

        return jit_cached(extension._extension_for_name(ext))
    except Exception:
        return None


def prebuild_kernel(backend_value: str, dtype: Any) -> Tuple[Optional[str], Optional[float], Optional[bool]]:
    """Build (or load from the JIT cache) the extension behind a kernel, timed; raise a clear error if it fails.
    Returns (extension, seconds, whether the build was cached before)."""
    import torch

    ext = _EXTENSIONS.get(backend_value)
    if ext is None:
        return None, None, None
    if ext == "marlin":
        ext = "marlin_bf16" if dtype == torch.bfloat16 else "marlin_fp16"
    from gptqmodel import extension

    cached = kernel_cached(ext)
    t0 = time.perf_counter()
    try:
        ok = extension.load(ext).get(ext, False)
    except Exception as exc:  # RuntimeError with the compiler's / downloader's message
        raise RuntimeError(f"method.backend: kernel '{backend_value}' will not build (extension '{ext}'): {exc}") from exc
    if not ok:
        raise RuntimeError(
            f"method.backend: kernel '{backend_value}' will not build (extension '{ext}'): {extension.error(ext)}"
        )
    return ext, time.perf_counter() - t0, cached


def count_kernels(model: Any) -> Dict[str, int]:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    counts: Dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, BaseQuantLinear):
            counts[type(mod).__name__] = counts.get(type(mod).__name__, 0) + 1
    return dict(sorted(counts.items()))


def load_quantized(checkpoint: str, cfg: Any, device_map: Any, kind: str, device_type: str,
                   trust_remote_code: bool = False) -> Tuple[Any, Dict[str, Any]]:
    import torch
    from gptqmodel import GPTQModel

    dtype = getattr(torch, cfg.dtype)
    requested = resolve_backend_name(cfg.backend, kind)
    if requested is None:
        backend, why = auto_backend(cfg, kind, device_type)
    else:
        backend, why = requested, "method.backend"
    local_qcfg = _local_quant_config(checkpoint)
    if local_qcfg is not None:  # fail before loading anything
        _check_checkpoint_matches(local_qcfg, cfg, kind, checkpoint)
    extension_name, compile_s, compile_cached = prebuild_kernel(backend, dtype)

    t0 = time.perf_counter()
    qm = GPTQModel.load(checkpoint, backend=backend, device_map=device_map, dtype=dtype,
                        trust_remote_code=trust_remote_code)
    load_s = time.perf_counter() - t0
    model = qm.model
    qcfg = _checkpoint_quant_config(model)
    _check_checkpoint_matches(qcfg, cfg, kind, checkpoint)
    kernels = count_kernels(model)
    if not kernels:
        raise RuntimeError(f"{checkpoint}: loaded, but no GPT-QModel quantized linear found in the model")

    warm = _warm_forwards(model, device_type)
    return model, {
        "backend_resolved": backend,
        "backend_reason": why,
        "kernels": kernels,
        "kernel_extension": extension_name,
        "kernel_compile_s": compile_s,
        "kernel_cache_hit": compile_cached,  # true: loaded from <run.cache_dir>/torch_extensions, not compiled
        "load_s_excluding_quantize": load_s,
        "first_forward_s": warm[0],
        "warmup_forwards_s": warm,
        "quantization_config": qcfg,
        "bits": qcfg.get("bits"),
        "group_size": qcfg.get("group_size"),
    }


def _checkpoint_quant_config(model: Any) -> Dict[str, Any]:
    qc = getattr(model.config, "quantization_config", None) or {}
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    qc = json.loads(json.dumps(qc, default=str))
    if isinstance(qc.get("meta"), dict):
        qc["meta"].pop("offload_to_disk_path", None)  # a temp dir of the build: noise
    return qc


def _local_quant_config(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The quantization config of a local checkpoint (config.json's, else quantize_config.json), or None."""
    d = Path(checkpoint).expanduser()
    for name, key in (("config.json", "quantization_config"), ("quantize_config.json", None), ("quant_config.json", None)):
        f = d / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            data = data.get(key) if key else data
            if isinstance(data, dict) and data:
                return data
    return None


def _check_checkpoint_matches(qcfg: Dict[str, Any], cfg: Any, kind: str, checkpoint: str) -> None:
    """A checkpoint whose bits / group size / method differ from method.* would make the analytic bytes lie."""
    method = str(qcfg.get("quant_method") or qcfg.get("method") or "").lower()
    problems = []
    if method and method != kind:
        problems.append(f"quant_method {method} (method.kind is {kind})")
    if qcfg.get("bits") is not None and int(qcfg["bits"]) != bits_of(cfg):
        problems.append(f"bits {qcfg['bits']} (method.bits is {bits_of(cfg)})")
    if qcfg.get("group_size") is not None and int(qcfg["group_size"]) != int(cfg.group_size):
        problems.append(f"group_size {qcfg['group_size']} (method.group_size is {cfg.group_size})")
    if problems:
        raise ValueError(f"method.checkpoint: '{checkpoint}' has {', '.join(problems)}; make method.* match it")


def _warm_forwards(model: Any, device_type: str, n: int = 3) -> list:
    """``n`` 8-token forwards, timed apart from the load and from the bench: kernels that compile on first
    call do it here (GPT-QModel's torch kernel torch.compiles its dequantization per layer, which takes the
    first two calls on a CPU; Triton JIT-compiles; Marlin sets up its workspace). The dequantization does not
    depend on the input shape, so later batch sizes and lengths do not compile again."""
    import torch

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    ids = torch.ones((1, 8), dtype=torch.long, device=device)
    times = []
    for _ in range(n):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=ids).logits
        if device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if not torch.isfinite(out).all():
            raise RuntimeError("the quantized model's forward gave non-finite logits")
    return times


# ---------------------------------------------------------------------------------------------------------
# quantize (runs in a child process)


def quantize_checkpoint(spec: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """Quantize into ``out_dir`` in a child process (or in this one with QBENCH_QUANTIZE_IN_PROCESS=1)."""
    out_dir = Path(out_dir)
    spec_path = out_dir / "qbench_quantize_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    if os.environ.get("QBENCH_QUANTIZE_IN_PROCESS", "0") == "1":
        return _quantize(spec, out_dir)

    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = out_dir / "quantize.log"
    with open(log_path, "wb") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "qbench.methods._gptqmodel", "--quantize", str(spec_path), "--out", str(out_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
        )
    error_path = out_dir / "qbench_quantize_error.json"
    if proc.returncode != 0:
        from qbench.store.rows import cause_line

        tail = _tail(log_path)
        if error_path.exists():
            err = json.loads(error_path.read_text())
            detail = cause_line(f"{err.get('type')}: {err.get('message')}")
            tail = err.get("traceback") or tail
        else:  # died without its error file (a worker thread, a signal): the log's last exception line
            detail = cause_line(tail)
        # The message is the cause in one line; the child's traceback / log tail rides along as the cause
        # of this exception, so the result's traceback holds it.
        raise RuntimeError(
            f"{spec['kind']} quantization of {spec['source']['path']} failed (exit code {proc.returncode}): {detail}"
        ) from ChildProcessError(tail)
    return json.loads((out_dir / "qbench_quantize_partial.json").read_text())


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL when the cell process dies (a cell timeout must not leave it running)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Path, n: int = 2000) -> str:
    try:
        text = path.read_bytes()[-20000:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    lines = [ln.split("\r")[-1].rstrip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln)[-n:]


def _quantize_config(cfg: Any, kind: str, device_type: str, offload_dir: Path):
    common = dict(bits=bits_of(cfg), group_size=int(cfg.group_size), sym=bool(cfg.sym),
                  offload_to_disk_path=str(offload_dir))
    if device_type == "cpu":
        common["device"] = "cpu"
    return method(kind).quantize_config(cfg, common, device_type)


def _quantize_kernels(kind: str, device_type: str) -> Dict[str, Any]:
    """The JIT extensions GPT-QModel's quantization loop builds on first use, as (name, loader, cache probe):
    the CPU packer (always: packing runs on the CPU) and, for GPTQ on a GPU, the fused CUDA block update of
    its 128-column loop (an nvcc build, otherwise paid inside the first cell's timed quantization)."""
    from gptqmodel import extension

    kernels: Dict[str, Any] = {"pack_block_cpu": (lambda: extension.load("pack_block_cpu"),
                                                  lambda: kernel_cached("pack_block_cpu"))}
    if kind == "gptq" and device_type == "cuda":
        from gptqmodel.quantization import gptq_cuda

        kernels["gptq_block_update"] = (gptq_cuda.block_update_available, lambda: jit_cached(gptq_cuda._EXTENSION))
    return kernels


# GPT-QModel packs the quantized weights on the CPU, with a C++ extension it JIT-builds on first use (102 s on an
# H200 node's host, once per cache) or, where that is disabled, with its torch code. SmolLM2-135M's 106 M linear
# weights pack in 0.94 s with the extension and 3.97 s without (2-core CPU, GPT-QModel 7.6's pack_block on every
# linear of the model): the build pays for itself only from about 3e9 weights. So a cache without the build packs
# smaller models with the torch code and builds nothing; a build already in the cache is always used, and
# GPT-QModel's own GPTQMODEL_DISABLE_PACK_EXT / GPTQMODEL_FORCE_PACK_EXT, when set, decide instead.
PACK_EXTENSION_MIN_WEIGHTS = 2_000_000_000


def linear_weight_count(model: Any) -> int:
    """Weights of the model's nn.Linear layers (meta tensors count too: nothing is read)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _skip_pack_extension(name: str, cached: Optional[bool], n_weights: Optional[int]) -> Optional[str]:
    """Why the CPU packer extension is not built for this quantization, or None to build (or load) it."""
    if name != "pack_block_cpu" or cached or n_weights is None or n_weights >= PACK_EXTENSION_MIN_WEIGHTS:
        return None
    if os.environ.get("GPTQMODEL_DISABLE_PACK_EXT") or os.environ.get("GPTQMODEL_FORCE_PACK_EXT"):
        return None  # the user's own choice, made through GPT-QModel's switches
    return (f"not in the cache and {n_weights / 1e9:.2f}e9 linear weights < {PACK_EXTENSION_MIN_WEIGHTS / 1e9:.0f}e9: "
            "packed by GPT-QModel's torch code (faster than building the extension at this size)")


def _build_quantize_kernels(kind: str, device_type: str, n_weights: Optional[int] = None) -> Dict[str, Any]:
    """Build (or load from ``<run.cache_dir>/torch_extensions``) what the quantization loop would JIT-build,
    timed apart from the quantization: about a minute on 2 cores for the CPU packer, which is skipped where
    building it costs more than it saves (``PACK_EXTENSION_MIN_WEIGHTS``). A build that fails is left to
    GPT-QModel's fallbacks (torch packer, eager GPTQ loop). Returns the quantize timings' kernel part."""
    builds: Dict[str, Any] = {}
    for name, (load, probe) in _quantize_kernels(kind, device_type).items():
        cached = probe()
        skip = _skip_pack_extension(name, cached, n_weights)
        if skip:
            os.environ["GPTQMODEL_DISABLE_PACK_EXT"] = "1"  # read by GPT-QModel at every pack; this process only
            builds[name] = {"s": 0.0, "cache_hit": cached, "built": False, "skipped": skip}
            continue
        t0 = time.perf_counter()
        try:
            result = load()  # extension.load: {name: bool}; block_update_available: bool
            ok = all(result.values()) if isinstance(result, dict) else bool(result)
        except Exception:
            ok = False
        builds[name] = {"s": time.perf_counter() - t0, "cache_hit": cached, "built": ok}
    hits = [b["cache_hit"] for b in builds.values() if not b.get("skipped")]
    return {"kernel_compile_s": sum(b["s"] for b in builds.values()),
            "kernel_cache_hit": None if not hits or None in hits else all(hits), "kernel_builds": builds}


def _region_totals(qm: Any) -> Dict[str, float]:
    """GPT-QModel's own region timer (the table its log prints) as {region: total seconds}: the parts of
    ``quantize_algorithm_s`` (layer forwards, the method's search, packing, disk offload...). Regions run on
    worker threads, so they may overlap and their sum may exceed the wall time."""
    try:
        snap = qm.quant_region_timer.snapshot()
    except Exception:  # another GPT-QModel version: no breakdown rather than no checkpoint
        return {}
    return {region: round(float(v["total"]), 3) for region, v in snap.items() if v.get("count")}


def _cuda_peaks() -> List[int]:
    import torch

    return [int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())]


def _quantize(spec: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """The build itself: calibration data, GPTQModel.load(src, config).quantize(data).save(out_dir)."""
    import shutil

    import torch

    from qbench.load import calibration
    from qbench.load.models import Source, load_tokenizer
    from qbench.store.jsonio import now_iso

    setup_env(Path(spec["cache_root"]))
    kind, device_type = spec["kind"], spec["device_type"]
    cfg = _ns(spec["method"])
    src = spec["source"]
    source = Source(**{k: src[k] for k in ("path", "revision", "trust_remote_code", "random_weights", "tokenizer_path")},
                    info=src.get("info") or {})

    from gptqmodel import GPTQModel
    from gptqmodel.utils.backend import BACKEND

    timings: Dict[str, Any] = {}
    # a method's own speed-ups of GPT-QModel's loop (AWQ: its clip search as a batched matmul); recorded
    speedups = getattr(method(kind), "before_quantize", dict)()

    if device_type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)

    t_start = time.perf_counter()
    tokenizer = load_tokenizer(source)
    rows, cal_info = calibration.build(cfg.calibration, tokenizer)
    timings["calibration_data_s"] = time.perf_counter() - t_start

    offload = out_dir / ".offload"
    qcfg = _quantize_config(cfg, kind, device_type, offload)
    kwargs: Dict[str, Any] = {"dtype": getattr(torch, cfg.dtype), "trust_remote_code": bool(source.trust_remote_code)}
    if source.revision:
        kwargs["revision"] = source.revision
    t0 = time.perf_counter()
    qm = GPTQModel.load(source.path, qcfg, **kwargs)
    timings["load_source_s"] = time.perf_counter() - t0
    # after the load, which says how many weights there are to pack; timed apart from quantize_s
    timings.update(_build_quantize_kernels(kind, device_type, linear_weight_count(qm.model)))
    # Packing kernel: the portable torch one (AWQ's default, the CUDA GEMM extension, would need nvcc here).
    pack_backend = BACKEND(f"{kind}_torch")
    t0 = time.perf_counter()
    qm.quantize(rows, batch_size=int(getattr(cfg.calibration, "batch_size", 8)), backend=pack_backend,
                calibration_sort=None)
    timings["quantize_algorithm_s"] = time.perf_counter() - t0
    timings["quantize_regions_s"] = _region_totals(qm)
    quantize_s = time.perf_counter() - t_start - timings["kernel_compile_s"]

    cuda_peaks = _cuda_peaks() if device_type == "cuda" else None
    peak_kind, peak = ("cuda_max_allocated", max(cuda_peaks)) if cuda_peaks else ("process_rss", None)
    t0 = time.perf_counter()
    qm.save(str(out_dir))
    timings["save_s"] = time.perf_counter() - t0
    generation_config = restore_generation_config(source.path, source.revision, out_dir)
    shutil.rmtree(offload, ignore_errors=True)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if peak is None:
        peak = rss_peak
    model_type = getattr(getattr(qm.model, "config", None), "model_type", None)
    return {
        "kind": kind,
        "quantize_s": quantize_s,
        "timings": timings,
        "quant_peak_memory_bytes": peak,
        "quant_peak_memory_kind": peak_kind,
        "quant_cuda_peak_allocated_bytes_by_device": cuda_peaks,
        "quant_rss_peak_bytes": rss_peak,
        "quant_device": device_type,
        "quantized_at": now_iso(),
        "source": src["path"],
        "model_type": model_type,
        "gptqmodel_class": type(qm).__name__,
        "generation_config": generation_config,
        "method_settings": weight_settings(cfg, kind),
        "calibration": cal_info,
        "quantize_speedups": speedups,
        "versions": versions(),
    }


def _main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description="qbench: quantize one checkpoint with GPT-QModel (child process)")
    parser.add_argument("--quantize", required=True, type=Path, help="spec JSON written by load()")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    spec = json.loads(args.quantize.read_text())
    try:
        meta = _quantize(spec, args.out)
    except BaseException as exc:
        import traceback

        message = str(exc)
        model_type = _model_type(spec["source"]["path"])
        if model_type and not _gptqmodel_supports(model_type):
            message = (f"model_type '{model_type}' is not in GPT-QModel's supported models (it tried module-tree "
                       f"auto-detection): {message}")
        (args.out / "qbench_quantize_error.json").write_text(
            json.dumps({"type": type(exc).__name__, "message": message[:4000], "traceback": traceback.format_exc()[-8000:]})
        )
        traceback.print_exc()
        return 1
    (args.out / "qbench_quantize_partial.json").write_text(json.dumps(meta, indent=2, default=str))
    return 0


def _model_type(path: str) -> Optional[str]:
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") if cfg.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def _gptqmodel_supports(model_type: str) -> bool:
    try:
        from gptqmodel.models.auto import SUPPORTED_MODELS

        return model_type in SUPPORTED_MODELS
    except Exception:
        return True


if __name__ == "__main__":
    sys.exit(_main())
