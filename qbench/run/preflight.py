"""Checks that need several stages, for every cell, before any model loads and before anything is written.

- the command line, parsed by Hydra's own argument parser, so that every spelling Hydra accepts
  (``--config-dir=DIR``, ``--config-dir DIR``, ``-cd DIR``, ``-cn``, ``-cp``) reaches the same preflight, with
  the same config search path the Hydra app will use;
- keys the schema does not know: Hydra's ``+key=value`` adds keys with the struct flag off, so a typo such as
  ``+bench.foo=1`` would slip past the typed schema; ``model.config_overrides`` keys are checked against the
  architecture's own config class;
- tokenizer vs model: a tokenizer whose ids run past the embedding table, or a folder without tokenizer files
  (transformers then builds an empty one), would measure garbage or crash deep inside lm-eval;
- the directories a cell writes (results, cache, GPU slot locks) must be writable;
- settings read by a room above qbench.config: ``bench.cpu_affinity`` by the parser the cell pins with;
- ``eval.tasks`` against the task table (qbench/evaluate/tasks.py) and the data at hand: offline, every task
  needs its data layout under ``eval.data_dir`` (a task with none, such as arc_challenge, needs the network);
- the method: its own ``validate``, its schema matching ``method.kind``, and its constraints against the
  model's shapes: a method module that defines ``check_widths(method_cfg, widths)`` is handed the input widths
  of the model's quantizable linear layers, built on the meta device from the model's config.json (no weights,
  no memory), and raises ConfigError naming the key when it cannot quantize them; one that defines
  ``check_device(method_cfg, device, capability)`` is told where the cell will run (when this host knows);
- every file the cell will read, before a model loads: a model folder's config.json and safetensors headers
  (tensor shapes against config.json's architecture), offline data rows (each task's own reader), corpora and
  calibration files (qbench.config.check_text_file, qbench.load.calibration.check_file);
- sizes against the model's limits: every sequence against its context length, and the cell's largest moment
  (weights + KV cache + activations, a lower bound) against the memory its device has.
docs/preflight.md lists them all.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import json
import os
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from qbench.errors import ConfigError

# Files a tokenizer is built from; a folder with none of them gives transformers' empty tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
MIN_TOKENIZER_SIZE = 16  # fewer tokens than this is no real tokenizer (a config.json-only folder gives 1)


# ----------------------------------------------------------------------------------------------- argv
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse would print usage and exit 2 by itself
        raise ConfigError(f"command line: {message}")


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The command line as the Hydra app will read it (Hydra's own parser: every flag, every spelling)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.__class__ = _Parser
    return parser.parse_args(argv)


@contextlib.contextmanager
def hydra_context(args: argparse.Namespace, default_conf_dir: str, app_file: Optional[str] = None) -> Iterator[None]:
    """Initialise Hydra's compose API with the search path ``hydra.main`` builds from the same flags
    (hydra/_internal/utils.py, _run_hydra): ``--config-path`` replaces the app's config dir (relative to the
    app's file), ``--config-dir`` joins the search path after it."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    primary = args.config_path if args.config_path is not None else default_conf_dir
    search_path = create_automatic_config_search_path(app_file, None, primary)
    if args.config_dir is not None:
        extra = os.path.abspath(args.config_dir)
        if not os.path.isdir(extra):
            raise ConfigError(f"--config-dir: '{args.config_dir}' is not a directory")
        search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        Hydra.create_main_hydra2(task_name="qbench", config_search_path=search_path)
        yield
    finally:
        GlobalHydra.instance().clear()


# ----------------------------------------------------------------------------------------------- schema
def unknown_keys(node: Any, schema: type, prefix: str = "") -> List[Tuple[str, List[str]]]:
    """(full key, known keys) for every key of ``node`` that the dataclass ``schema`` does not declare.
    Dict-typed fields (config_overrides, num_fewshot, ...) hold free keys and are not descended into."""
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    out = []
    for key in node:
        key = str(key)
        if key not in known:
            out.append((f"{prefix}{key}", known))
            continue
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and hasattr(node[key], "keys"):
            out += unknown_keys(node[key], _own_schema(node[key], hint), f"{prefix}{key}.")
    return out


def _own_schema(node: Any, hint: type) -> type:
    """The schema a node was composed with when it refines the declared one (a method's Config), else the hint."""
    from omegaconf import DictConfig, OmegaConf

    own = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    return own if isinstance(own, type) and dataclasses.is_dataclass(own) and issubclass(own, hint) else hint


def _suggest(word: str, known: List[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_schema_keys(cfg: Any) -> None:
    from qbench.config import QBenchConfig

    bad = unknown_keys({k: cfg[k] for k in cfg if k != "hydra"}, QBenchConfig)
    if bad:
        key, known = bad[0]
        raise ConfigError(f"{key}: unknown key (a '+' override or a YAML adds a key the schema does not have)"
                          f"{_suggest(key.rsplit('.', 1)[-1], known)}")


# ----------------------------------------------------------------------------------------------- model
def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def base_model_config(m: Any) -> Tuple[Optional[Dict[str, Any]], bool]:
    """(config.json of the model the cell will build or load, whether model.config_overrides apply to it).
    A Hub model's config is read only where it is on disk (its bundled architecture): None otherwise, and
    the cell checks the tokenizer against the loaded model instead (check_tokenizer_fits)."""

    from qbench.load import models, tiny

    if m.source == "builtin:tiny":
        return dict(tiny.TINY_LLAMA), False
    if m.random_init:
        return models._load_config_dict(m), True
    if models.is_gguf(m.source):  # dequantized at resolve; the cell checks its tokenizer once loaded
        return None, False
    local = Path(m.source).expanduser() / "config.json"
    if local.exists():
        return models.read_config_json(local), False
    if m.architecture:
        return models.architecture_config(m.architecture), False
    return None, False


def check_config_overrides(m: Any, base: Dict[str, Any], applies: bool) -> None:
    overrides = dict(m.config_overrides)
    if not overrides:
        return
    if not applies:
        raise ConfigError(
            f"model.config_overrides: {', '.join(overrides)} would be ignored: overrides apply only to "
            f"random-init models (model.random_init=true), and model.source '{m.source}' loads its own config"
        )
    from transformers import CONFIG_MAPPING

    model_type = (base or {}).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model.config_overrides: model_type '{model_type}' is not known to transformers")
    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}) or {}) | set(base or {})
    for key in overrides:
        if key not in known:
            raise ConfigError(f"model.config_overrides.{key}: not a field of {cls.__name__}"
                              f"{_suggest(key, sorted(known))}")


def vocab_size(config: Dict[str, Any]) -> Optional[int]:
    """Rows of the input embedding: the text config's vocab_size (multimodal configs nest it)."""
    for d in (config, config.get("text_config") or {}):
        if isinstance(d, dict) and isinstance(d.get("vocab_size"), int):
            return d["vocab_size"]
    return None


@functools.lru_cache(maxsize=16)
def _tokenizer_size(source: str, revision: Optional[str], trust_remote_code: bool, local_only: bool) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code,
                                        local_files_only=local_only)
    return len(tok)


def tokenizer_size(m: Any) -> Tuple[Optional[int], str]:
    """(tokens the cell's tokenizer can emit, where that tokenizer comes from), as qbench.load.models picks it.
    None for a Hub tokenizer not on disk yet: preflight does not download; the cell checks it after loading."""
    from qbench.load import tiny
    from qbench.load.models import is_gguf

    if m.tokenizer:
        src, key = m.tokenizer, "model.tokenizer"
    elif is_gguf(m.source) and not m.random_init:
        return None, f"the tokenizer inside model.source '{m.source}'"
    elif m.source == "builtin:tiny" or (m.random_init and not _is_local(m.source)):
        return tiny.VOCAB_SIZE, "the demo tokenizer (random-init without a local source)"
    else:
        src, key = m.source, "model.source"
    path = Path(src).expanduser()
    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(f"{key}: '{src}' holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                          "point model.tokenizer at the model's tokenizer")
    revision = m.revision if key == "model.source" else None
    try:
        n = _tokenizer_size(str(path) if path.exists() else src, revision, bool(m.trust_remote_code), not path.exists())
    except OSError:
        if not path.exists():  # a Hub tokenizer not in the local cache
            return None, f"{key} '{src}'"
        raise ConfigError(f"{key}: the tokenizer at '{src}' does not load") from None
    except Exception as exc:  # transformers' many load errors: say which tokenizer failed, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{key}: the tokenizer at '{src}' does not load ({type(exc).__name__}: {first})") from None
    return n, f"{key} '{src}'"


def tokenizer_fit_problem(n: int, rows: Optional[int], where: str) -> Optional[str]:
    """Why a tokenizer of ``n`` tokens does not fit an embedding of ``rows`` rows, or None."""
    if n < MIN_TOKENIZER_SIZE:
        return (f"model.tokenizer: {where} has only {n} token(s): no real tokenizer; "
                "point model.tokenizer at the model's tokenizer")
    if rows is not None and n > rows:
        return (f"model.tokenizer: {where} has {n} tokens but the model's embedding has {rows} rows "
                f"(vocab_size): ids from {rows} on would index past it")
    return None


def check_tokenizer(m: Any, config: Optional[Dict[str, Any]]) -> None:
    n, where = tokenizer_size(m)
    problem = None if n is None else tokenizer_fit_problem(n, vocab_size(config) if config else None, where)
    if problem:
        raise ConfigError(problem)


def check_model(cfg: Any) -> None:
    """config_overrides and tokenizer of one cell, from config files only: no weights are read."""
    m = cfg.model
    config, applies = base_model_config(m)
    check_config_overrides(m, config, applies)
    if applies:
        config = {**config, **dict(m.config_overrides)}
    check_tokenizer(m, config)


# ----------------------------------------------------------------------------------------------- model files
def check_model_files(m: Any) -> None:
    """A local model folder's files, from their headers only (no weights loaded): config.json parses, every
    safetensors file (and the shard index) is readable, and every tensor has the shape config.json's architecture
    gives it, with none of the architecture's tensors missing (transformers would fill it with random values).
    A folder that holds no safetensors (pytorch_model.bin) or an already quantized checkpoint is not compared."""
    from qbench.load import models

    folder = Path(m.source).expanduser()
    if m.random_init or m.source.startswith("builtin:") or models.is_gguf(m.source) or not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.source: '{folder}' holds no config.json: not a transformers model folder")
    config = models.read_config_json(folder / "config.json")
    found = safetensors_shapes(folder)
    if found is None or "quantization_config" in config:
        return
    expected = dict(_state_shapes(json.dumps(config, sort_keys=True, default=str)))
    _compare_shapes(folder, found, expected, config)


def safetensors_shapes(folder: Path) -> Optional[Dict[str, Tuple[Tuple[int, ...], str]]]:
    """{tensor name: (shape, file)} from the headers of the folder's safetensors files (the index's shards
    where there is an index); None when the folder has none. ConfigError names a broken file."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"model.source: '{index}' is not a safetensors index ({type(exc).__name__}: {exc})") from None
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        return None
    out: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"model.source: '{path}' is missing (named by {index.name})")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safetensors file handle, not a dict: it has no __iter__
                    out[key] = (tuple(f.get_slice(key).get_shape()), str(path))
        except Exception as exc:  # safetensors' own errors: header too short, not JSON, offsets past the end
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"model.source: '{path}' has a broken safetensors header ({first})") from None
    return out


@functools.lru_cache(maxsize=8)
def _state_shapes(config_json: str) -> tuple:
    """(name, shape) of every tensor of the architecture's state dict, built on the meta device, plus its
    base_model_prefix and tied names: what a checkpoint of this config.json must hold."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = json.loads(config_json)
    config = AutoConfig.for_model(config_dict.pop("model_type"),
                                  **{k: v for k, v in config_dict.items() if k != "transformers_version"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["\0prefix"] = model.base_model_prefix
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    # a tied output embedding is saved once, under the input embedding's name
    shapes["\0tied"] = tuple(f"{name}.weight" for name, mod in model.named_modules() if tied and mod is head)
    return tuple(shapes.items())


def _compare_shapes(folder: Path, found: Dict[str, Tuple[Tuple[int, ...], str]], expected: Dict[str, Any],
                    config: Dict[str, Any]) -> None:
    prefix, tied = expected.pop("\0prefix"), set(expected.pop("\0tied"))
    names = {k: k if k in expected else f"{prefix}.{k}" for k in found}  # checkpoints saved without the prefix
    for key, (shape, path) in found.items():
        want = expected.get(names[key])
        if want is not None and tuple(want) != shape:
            raise ConfigError(
                f"model.source: tensor '{key}' in '{path}' has shape {list(shape)} but '{folder / 'config.json'}' "
                f"(model_type {config.get('model_type')}) gives it {list(want)}: the weights and config.json differ")
    missing = [k for k in expected if k not in set(names.values()) and k not in tied]
    if missing:
        raise ConfigError(
            f"model.source: '{folder}' lacks {len(missing)} tensor(s) of the architecture '{folder / 'config.json'}' "
            f"describes (first: '{missing[0]}'); transformers would fill them with random values")


# ----------------------------------------------------------------------------------------------- dirs
def check_dirs(cfg: Any) -> None:
    from qbench.measure.gpu_state import lock_dir
    from qbench.store.jsonio import check_writable

    check_writable(Path(cfg.run.runs_dir), key="run.runs_dir")
    check_writable(Path(cfg.run.cache_dir).expanduser(), key="run.cache_dir")
    check_writable(lock_dir(), key="GPU slot locks (QBENCH_LOCK_DIR)")


def check_model_source(m: Any) -> None:
    """A .gguf source exists (saying how to fetch a packaged one) and holds an architecture transformers reads;
    a named bundled architecture exists. (config.validate checks the other sources: it sits below qbench.load.models.)"""
    from qbench.load import models, weights

    if m.source.lower().endswith(".gguf") and not m.source.startswith("builtin:"):
        path = Path(m.source).expanduser()
        if not path.is_file():
            name = weights.find_packaged(path)
            hint = f"; fetch it with `make weights` (python -m qbench.load.weights {name} --dest {path.parent})" if name else ""
            raise ConfigError(f"model.source: GGUF file '{path}' does not exist{hint}")
        models.check_gguf(path)
    if m.architecture is not None and not models.architecture_path(m.architecture).exists():
        raise ConfigError(f"model.architecture: no bundled config.json named '{m.architecture}'")


def check_cpu_affinity(b: Any) -> None:
    """bench.cpu_affinity is null, gpu_local or a cpulist: read by the parser the cell pins with (qbench.config,
    below qbench.measure, cannot call it)."""
    from qbench.measure.cpu_affinity import GPU_LOCAL, parse_cpulist

    if b.cpu_affinity is not None and b.cpu_affinity != GPU_LOCAL:
        try:
            parse_cpulist(b.cpu_affinity)
        except ValueError as exc:
            raise ConfigError(
                f"bench.cpu_affinity: '{b.cpu_affinity}' is neither null, {GPU_LOCAL} nor a CPU list like 0-3,8 ({exc})"
            ) from None


def check_cell(cfg: Any) -> None:
    """Raise ConfigError (one line) when the cell cannot run as configured."""
    check_cpu_affinity(cfg.bench)
    check_model_source(cfg.model)
    check_method(cfg)
    check_decode_paths(cfg)
    check_schema_keys(cfg)
    check_eval(cfg)
    check_model(cfg)
    check_model_files(cfg.model)
    check_method_widths(cfg)
    check_method_device(cfg)
    check_resources(cfg)


def register_configs() -> None:
    """Every schema in Hydra's ConfigStore: the config groups' (qbench.config) and each method's own."""
    from qbench import config, methods

    config.register_configs()
    methods.register_schemas()


# ----------------------------------------------------------------------------------------------- method
def check_method(cfg: Any) -> None:
    """The method's kind is known, its YAML composed its own schema, and its values pass its validate()."""
    from omegaconf import OmegaConf

    from qbench import methods

    method = methods.get(cfg.method.kind, key="method.kind")
    schema = OmegaConf.get_type(cfg.method)
    if schema is not method.Config:
        raise ConfigError(f"method.kind: '{cfg.method.kind}' does not match the schema the method YAML names "
                          f"({getattr(schema, '__module__', schema)}); its defaults list needs schema/{cfg.method.kind}")
    method.validate(cfg.method)


def check_decode_paths(cfg: Any) -> None:
    """Every name of bench.decode_paths is a module of the decode-path registry (qbench.measure.decode_paths)."""
    from qbench.measure import decode_paths

    for path in cfg.bench.decode_paths:
        decode_paths.get(str(path), key="bench.decode_paths")


# ----------------------------------------------------------------------------------------------- eval
def check_eval(cfg: Any) -> None:
    """The cell's tasks against the task table, and offline, against the files under eval.data_dir: present, and
    every row of every file parses as the task's reader will parse it."""
    from qbench.errors import eval_offline
    from qbench.evaluate import tasks

    tasks.check(cfg.eval)
    e = cfg.eval
    if e.enabled and eval_offline(e) and e.data_dir is not None:
        for path in offline_data_files(list(e.tasks), e.data_dir, list(e.mmlu_subjects)):
            stat = path.stat()
            _check_data_rows(str(path), stat.st_mtime_ns, stat.st_size)


def offline_data_files(names: List[str], data_dir: str, subjects: List[str]) -> List[Path]:
    """Every file the offline tasks will read under ``data_dir`` (qbench/evaluate/lm_eval_tasks/*/utils.py: load_*)."""
    from qbench.evaluate import tasks as table

    root = table.data_root(data_dir)
    out: List[Path] = []
    for name in names:
        t = table.TASKS.get(name)
        if t is None or t.offline_task is None:
            continue
        for pattern in t.data_files:
            if table.SUBJECT not in pattern:
                out.append(root / pattern)
                continue
            # a subject task's dev split has a validation split beside it, which its loader reads where present
            for pat in (pattern, pattern.replace("dev", "val")) if "/dev/" in pattern else (pattern,):
                found = [root / pat.replace(table.SUBJECT, s) for s in subjects] if subjects else \
                    sorted(root.glob(pat.replace(table.SUBJECT, "*")))
                out += [p for p in found if p.exists()]
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=512)
def _check_data_rows(path: str, _mtime_ns: int, _size: int) -> None:
    """Parse one offline data file with the task's own reader; ConfigError naming eval.data_dir, the file and
    the line. Cached by (path, mtime, size): a sweep's cells read the same files."""
    from qbench.evaluate.lm_eval_tasks.gsm8k.utils import read_jsonl
    from qbench.evaluate.lm_eval_tasks.mmlu.utils import read_mmlu_csv

    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"eval.data_dir: '{path}' is not UTF-8 text (line {line}: {exc.reason})") from None
    try:
        if path.endswith(".csv"):
            read_mmlu_csv(path, Path(path).stem.rsplit("_", 1)[0])
            return
        for line_no, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            try:
                line.strip() and json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
        read_jsonl(path)
    except (ValueError, csv.Error) as exc:  # the readers say "<file>:<line>: what is wrong"
        raise ConfigError(f"eval.data_dir: {exc}") from None


# ----------------------------------------------------------------------------------------------- method x model
def check_method_widths(cfg: Any) -> None:
    """The cell's method against the widths of the cell's model."""
    from qbench import methods

    method = methods.get(cfg.method.kind)
    check = getattr(method, "check_widths", None)
    if check is None:
        return
    widths = linear_input_widths(cfg.model)
    if widths:
        check(cfg.method, widths, cfg.model.name)


def cell_device(cfg: Any) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """(cpu | cuda, the first GPU's compute capability) where the cell will run, or (None, None) when this
    host cannot tell: a SLURM sweep runs its cells on other nodes (the method checks again when it loads)."""
    if cfg.bench.device == "cpu":
        return "cpu", None
    launcher = str(_select(cfg, "hydra.launcher._target_") or "")
    if launcher.endswith("SlurmLauncher"):
        return None, None
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    return "cuda", tuple(torch.cuda.get_device_capability(0))


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(cfg, key)
    except Exception:  # no hydra node (a config composed without it)
        return None


def check_method_device(cfg: Any) -> None:
    from qbench import methods

    check = getattr(methods.get(cfg.method.kind), "check_device", None)
    device, capability = cell_device(cfg)
    if check is not None and device is not None:
        check(cfg.method, device, capability)


def linear_input_widths(model_cfg: Any) -> Dict[int, List[str]]:
    """in_features -> names of the nn.Linear layers with it (lm_head excluded); {} when the config is not at hand."""
    from qbench.load import models

    try:
        config = models.config_dict(model_cfg)
    except (OSError, ValueError):
        return {}  # a Hub config that cannot be fetched here: the cell itself will say what is wrong
    return dict(_widths(json.dumps(config, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=16)
def _widths(config_json: str) -> tuple:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = json.loads(config_json)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in config_dict.items() if k != "transformers_version"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    out: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            out.setdefault(int(module.in_features), []).append(name)
    return tuple(sorted(out.items()))


# ----------------------------------------------------------------------------------------------- resources
GIB = 2**30


def context_tokens(config: Dict[str, Any]) -> Optional[int]:
    """The model's context length (max_position_embeddings; multimodal configs nest it in text_config)."""
    for d in (config.get("text_config") or {}, config):
        if isinstance(d, dict) and isinstance(d.get("max_position_embeddings"), int):
            return d["max_position_embeddings"]
    return None


def lengths_asked(cfg: Any) -> List[Tuple[str, int]]:
    """(key, tokens) of every sequence the cell will feed the model at once."""
    b, e = cfg.bench, cfg.eval
    out: List[Tuple[str, int]] = []
    if b.enabled:
        out += [("bench.prompt_tokens", int(p)) for p in b.prompt_tokens]
        out.append(("bench.decode_prompt_tokens + bench.new_tokens", int(b.decode_prompt_tokens) + int(b.new_tokens)))
    if e.quality.enabled:
        out.append(("eval.quality.ctx_tokens", int(e.quality.ctx_tokens)))
    if e.perplexity.enabled:
        out.append(("eval.perplexity.seq_len_tokens", int(e.perplexity.seq_len_tokens)))
    if e.enabled and e.max_length_tokens is not None:
        out.append(("eval.max_length_tokens", int(e.max_length_tokens)))
    calibration = getattr(cfg.method, "calibration", None)
    if calibration is not None and getattr(calibration, "seq_len_tokens", None):
        out.append(("method.calibration.seq_len_tokens", int(calibration.seq_len_tokens)))
    return out


def check_context(cfg: Any, config: Dict[str, Any]) -> None:
    """Every sequence the cell feeds the model fits its context: past it, positions the model never learnt
    (or a RoPE table that runs out) give figures that are measured but mean nothing."""
    limit = context_tokens(config)
    if limit is None:
        return
    for key, tokens in lengths_asked(cfg):
        if tokens > limit:
            raise ConfigError(f"{key}: {tokens} tokens exceed the context of model '{cfg.model.name}' "
                              f"({limit} tokens, max_position_embeddings)")


def device_memory(cfg: Any) -> Optional[Tuple[int, str]]:
    """(bytes the cell's model may occupy, a sentence template for that figure in GiB), or None when this host
    cannot tell.
    GPU: the total memory of the cell's model.num_gpus smallest cards, from NVML (no CUDA context is created);
    CPU: the memory available now (psutil), what the process can grow into."""
    device, _capability = cell_device(cfg)
    if device == "cpu" and cfg.bench.device == "cuda":
        return None  # a GPU cell on a host without one: not this check's to say (the cell and its method are)
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().available), "the host has {:.2f} GiB available (psutil)"
    if device != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            totals = sorted(int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total)
                            for i in range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML here: the cell meets the limit itself
        return None
    n = int(cfg.model.num_gpus)
    if len(totals) < n:
        return None
    return sum(totals[:n]), f"model.num_gpus={n} GPU(s) hold {{:.2f}} GiB in total (NVML)"


def weight_bytes(cfg: Any, config: Dict[str, Any]) -> int:
    """The weights as the method stores them (qbench.measure.memory.analytic_weights: parameter counts and the
    method's bits per weight, on the meta device): what the cell holds at least, whatever it loads through."""
    from qbench import methods
    from qbench.measure import memory

    return int(memory.analytic_weights(config, methods.get(cfg.method.kind), cfg.method,
                                       bool(cfg.model.trust_remote_code))["weight_bytes_analytic"])


def memory_needs(cfg: Any, config: Dict[str, Any]) -> List[Tuple[str, str, int, int, int]]:
    """(key, what, KV-cache bytes, activation bytes, batch) of each phase's largest moment, beside the weights.
    Lower bounds: a full-attention KV cache at the compute dtype, the residual stream and the MLP's two
    intermediate outputs of one layer (prefill), fp32 log-probabilities over the vocabulary (quality)."""
    from qbench.measure import memory

    text = config.get("text_config") or config
    hidden, inter = int(text.get("hidden_size") or 0), int(text.get("intermediate_size") or 0)
    vocab = vocab_size(config) or 0
    nbytes = memory.dtype_bytes(cfg.method.dtype)
    per_token_act = (hidden + 2 * inter) * nbytes
    out = []
    b = cfg.bench
    if b.enabled:
        decode = int(b.decode_prompt_tokens) + int(b.new_tokens)
        # (tokens cached, tokens through the layers at once, what): a decode's widest step is its prompt's prefill
        phases = [(int(p), int(p), f"prefill of {int(p)} tokens") for p in b.prompt_tokens]
        phases.append((decode, int(b.decode_prompt_tokens), f"decode to {decode} tokens"))
        for batch in b.batch_sizes:
            for cached, wide, what in phases:
                kv = memory.kv_cache_bytes(config, int(batch), cached, nbytes)
                out.append(("bench.batch_sizes", f"batch {int(batch)}, {what}", kv,
                            int(batch) * wide * per_token_act, int(batch)))
    q = cfg.eval.quality
    if q.enabled:
        n, ctx = int(q.batch_size), int(q.ctx_tokens)
        kv = memory.kv_cache_bytes(config, n, ctx, nbytes)
        act = n * ctx * per_token_act + n * (ctx // 2) * vocab * (nbytes + 4)  # logits, then fp32 log-softmax
        out.append(("eval.quality.batch_size", f"{n} windows of {ctx} tokens", kv, act, n))
    return out


def check_memory(cfg: Any, config: Dict[str, Any]) -> None:
    """The cell's largest moment against the memory its device has: past it the cell grows until the allocator
    fails (or the kernel's OOM killer ends it), minutes in, with nothing measured."""
    have = device_memory(cfg)
    needs = memory_needs(cfg, config)
    if have is None or not needs:
        return
    capacity, where = have
    weights = weight_bytes(cfg, config)
    key, what, kv, act, _batch = max(needs, key=lambda n: n[2] + n[3])
    need = weights + kv + act
    if need > capacity:
        lower = {"bench.batch_sizes": "bench.batch_sizes, bench.prompt_tokens or bench.new_tokens",
                 "eval.quality.batch_size": "eval.quality.batch_size or eval.quality.ctx_tokens"}[key]
        raise ConfigError(
            f"{key}: {what} needs at least {need / GIB:.2f} GiB (weights {weights / GIB:.2f} GiB + KV cache "
            f"{kv / GIB:.2f} GiB + activations {act / GIB:.2f} GiB) but {where.format(capacity / GIB)}; "
            f"lower {lower}")


def check_resources(cfg: Any) -> None:
    """Sizes against the model's limits: context length, and memory against what the cell's device has. Needs
    the model's config.json; a Hub model not at hand is checked by the cell itself."""
    from qbench.load import models

    try:
        config = models.config_dict(cfg.model)
    except (OSError, ValueError):
        return
    check_context(cfg, config)
    check_memory(cfg, config)
