"""Load stage, first half: turn a model config into a ``Source`` every method can load from.

A source is always something ``from_pretrained`` accepts: a Hub id or a local model directory as given, or a
directory qbench writes once into its cache:

- a local ``.gguf`` file (llama.cpp's format) is dequantized by transformers and saved as an ordinary model
  folder keyed by the file's sha256, so every method loads it like any local model;
- the builtin tiny model and random-init mode (``model.random_init: true``, and only then) get random weights
  from a fixed seed, saved as safetensors.

Materialising on disk costs one write per file or architecture and seed, and in exchange every method
(bitsandbytes, GPT-QModel) takes the same path as with real weights.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from qbench.store.identity import content_hash

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"


@dataclass
class Source:
    """Where a cell's unquantized model comes from, plus what the result must say about it."""

    path: str  # Hub id or local directory, handed to from_pretrained
    revision: Optional[str]
    trust_remote_code: bool
    random_weights: bool  # true: accuracy sits at chance
    tokenizer_path: str
    info: Dict[str, Any] = field(default_factory=dict)


def architecture_path(name: str) -> Path:
    return ARCHITECTURES_DIR / f"{name}.json"


def architecture_config(name: str) -> Dict[str, Any]:
    """A bundled architecture's config.json (qbench/load/architectures/<name>.json) as a dict."""
    return json.loads(architecture_path(name).read_text())


def config_dict(model_cfg: Any) -> Dict[str, Any]:
    """The model's config.json as it will be built: its source's (or bundled architecture's) plus overrides."""
    out = _load_config_dict(model_cfg)
    out.update(dict(model_cfg.config_overrides or {}))
    return out


def _load_config_dict(model_cfg: Any) -> Dict[str, Any]:
    """config.json of the architecture: the builtin tiny model's, a local dir's, a bundled one, or the Hub's
    (online only). Every source resolve() can build has a case here: a source without one fell through to the
    Hub lookup, whose OSError preflight reads as "config not at hand" and so skipped every width check."""
    if model_cfg.source == "builtin:tiny":
        from qbench.load import tiny

        return dict(tiny.TINY_LLAMA)
    local = Path(model_cfg.source).expanduser()
    if is_gguf(model_cfg.source) and local.is_file():
        stat = local.stat()
        return json.loads(_gguf_config_json(str(local), stat.st_mtime_ns, stat.st_size))
    if (local / "config.json").exists():
        return read_config_json(local / "config.json")
    if model_cfg.architecture:
        return architecture_config(model_cfg.architecture)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        model_cfg.source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    return config.to_dict()


def read_config_json(path: Path, key: str = "model.source") -> Dict[str, Any]:
    """A model folder's config.json as a dict, or ConfigError naming the key, the file and the line."""
    from qbench.errors import ConfigError

    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{key}: '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: '{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except OSError as exc:
        raise ConfigError(f"{key}: '{path}' cannot be read ({exc.strerror})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"{key}: '{path}' has no model_type: not a transformers config.json")
    return config


GGUF_ARCHITECTURE_FILE = "gguf_architecture.txt"  # in a converted GGUF's folder: general.architecture


@functools.lru_cache(maxsize=8)
def _gguf_config_json(path: str, _mtime_ns: int, _size: int) -> str:
    """A GGUF's config as JSON, parsed from its header once per file version: preflight asks for it in several
    checks of every cell, and the header (its tokenizer included) takes seconds to read."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return json.dumps(load_gguf_checkpoint(path, return_tensors=False)["config"], default=str)


def resolve(model_cfg: Any, cache_dir: str | Path, device: str = "cpu") -> Source:
    """The Source for ``model_cfg``, writing the tiny or random-init model into the cache if needed."""
    cache = Path(cache_dir).expanduser()
    if model_cfg.source == "builtin:tiny":
        from qbench.load import tiny

        key = content_hash({"tiny": tiny.TINY_LLAMA, "seed": model_cfg.seed, "v": 1})
        out = cache / "models" / f"tiny-{key}"
        info = _materialise(out, lambda tmp: tiny.build(tmp, seed=model_cfg.seed))
        return Source(str(out), None, False, True, str(out), {"built": "qbench.load.tiny", **info})

    if is_gguf(model_cfg.source) and not model_cfg.random_init:
        return _gguf_source(Path(model_cfg.source).expanduser(), cache, model_cfg)

    if not model_cfg.random_init:
        path = str(Path(model_cfg.source).expanduser()) if Path(model_cfg.source).expanduser().exists() else model_cfg.source
        return Source(
            path,
            model_cfg.revision,
            bool(model_cfg.trust_remote_code),
            False,
            model_cfg.tokenizer or path,
            {},
        )

    config_dict = _load_config_dict(model_cfg)
    config_dict.update(dict(model_cfg.config_overrides))
    key = content_hash({"config": config_dict, "seed": model_cfg.seed, "dtype": model_cfg.dtype, "v": 1})
    out = cache / "models" / f"random-{model_cfg.name}-{key}"
    info = _materialise(out, lambda tmp: _build_random(tmp, config_dict, model_cfg, device))
    return Source(str(out), None, bool(model_cfg.trust_remote_code), True, str(out), {"config_hash": key, **info})


def is_gguf(source: str) -> bool:
    return str(source).lower().endswith(".gguf")


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file, read from its header up to that key (qbench/load/gguf_header.py)."""
    from qbench.load import gguf_header

    arch = gguf_header.read(path, stop_at="general.architecture")["kv"].get("general.architecture")
    if not isinstance(arch, str):
        raise KeyError("general.architecture")
    return arch


def check_gguf(path: Path) -> str:
    """The GGUF's architecture, or ConfigError (one line) when transformers cannot dequantize it.

    transformers' own GGUF reader parses the header (no tensor is read), so what it accepts here it loads later.
    """
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from qbench.errors import ConfigError

    try:
        arch = gguf_architecture(path)
    except Exception as exc:  # any parse failure means the same thing to the user
        raise ConfigError(f"model.source: '{path}' is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    try:
        stat = path.stat()
        _gguf_config_json(str(path), stat.st_mtime_ns, stat.st_size)  # the config every later check reads
    except (ValueError, KeyError) as exc:
        raise ConfigError(
            f"model.source: '{path}' holds a GGUF of architecture '{arch}', which transformers cannot load "
            f"({exc}); it reads {', '.join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {'general', 'tokenizer'}))}"
        ) from None
    return arch


def _gguf_source(path: Path, cache: Path, model_cfg: Any) -> Source:
    """A GGUF file, dequantized once into ``<cache>/models/gguf-<stem>-<sha256>`` as an ordinary model folder."""
    from qbench.load.weights import sha256_of

    digest = sha256_of(path)
    out = cache / "models" / f"gguf-{path.stem}-{digest[:16]}"
    # preflight ran check_gguf already; the full check runs again only when a conversion is due (no preflight
    # before a direct call), not on every cell that finds the converted folder in the cache
    info = _materialise(out, lambda tmp: _convert_gguf(path, tmp, model_cfg.dtype, check_gguf(path)))
    # the architecture the conversion recorded: reading it from the GGUF again parses its whole header (the
    # tokenizer's 49,152 entries for SmolLM2: 2.1 s of every cell); folders converted before it was kept read it
    recorded = out / GGUF_ARCHITECTURE_FILE
    arch = recorded.read_text().strip() if recorded.is_file() else gguf_architecture(path)
    tok = model_cfg.tokenizer or str(out)
    return Source(str(out), None, False, False, tok,
                  {"gguf_file": str(path), "gguf_sha256": digest, "gguf_architecture": arch,
                   "dequantized_dtype": model_cfg.dtype, **info})


def _convert_gguf(path: Path, out: Path, dtype: str, architecture: str) -> None:
    """Dequantize a GGUF (transformers' own reader) and save it with its tokenizer as safetensors, and the
    GGUF's architecture (``GGUF_ARCHITECTURE_FILE``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    # transformers marks a GGUF-loaded model as quantized "with gguf" and refuses to save it; its tensors are
    # already dequantized, so the marks are dropped and the model saves as an ordinary one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    (out / GGUF_ARCHITECTURE_FILE).write_text(architecture + "\n")


def _materialise(out: Path, build) -> Dict[str, Any]:
    """Build into a temp dir and rename, under a lock, so parallel cells build a model once."""
    from qbench.store.locks import file_lock

    if (out / ".complete").exists():
        return {"materialised_cached": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):
        if (out / ".complete").exists():
            return {"materialised_cached": True}
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        t0 = time.perf_counter()
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if out.exists():  # a directory without .complete: left by an interrupted build
            shutil.rmtree(out)
        os.replace(tmp, out)
        return {"materialised_cached": False, "materialise_s": time.perf_counter() - t0}


def _build_random(out: Path, config_dict: Dict[str, Any], model_cfg: Any, device: str) -> None:
    """Random weights at the architecture's real size, plus a tokenizer (the model's if local, else tiny's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in config_dict.items() if k != "transformers_version"})
    torch.manual_seed(model_cfg.seed)
    build_device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    with torch.device(build_device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, model_cfg.dtype))
    model.save_pretrained(out)
    del model
    tok_src = model_cfg.tokenizer or (model_cfg.source if Path(model_cfg.source).expanduser().exists() else None)
    if tok_src:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tok_src).save_pretrained(out)
    else:
        # No tokenizer travels with a bundled architecture: the demo tokenizer's ids (2048) fit any vocab.
        from qbench.load import tiny

        tiny.build_tokenizer().save_pretrained(out)


def load_tokenizer(source: Source):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        source.tokenizer_path, revision=source.revision, trust_remote_code=source.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def from_pretrained(source: Source, device_map: Any, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` with the source's revision and trust settings."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        source.path,
        revision=source.revision,
        trust_remote_code=source.trust_remote_code,
        device_map=device_map,
        **kwargs,
    )
