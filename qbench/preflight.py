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
- ``eval.tasks`` against the task table (qbench/evaluate/tasks.py) and the data at hand: offline, every task
  needs its data layout under ``eval.data_dir`` (a task with none, such as arc_challenge, needs the network);
- the method: its own ``validate``, its schema matching ``method.kind``, and its constraints against the
  model's shapes: a method module that defines ``check_widths(method_cfg, widths)`` is handed the input widths
  of the model's quantizable linear layers, built on the meta device from the model's config.json (no weights,
  no memory), and raises ConfigError naming the key when it cannot quantize them; one that defines
  ``check_device(method_cfg, device, capability)`` is told where the cell will run (when this host knows).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import json
import os
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from qbench.config import ConfigError

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
    for key in node.keys():
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

    bad = unknown_keys({k: cfg[k] for k in cfg.keys() if k != "hydra"}, QBenchConfig)
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
    import json

    from qbench import models, tiny

    if m.source == "builtin:tiny":
        return dict(tiny.TINY_LLAMA), False
    if m.random_init:
        return models._load_config_dict(m), True
    if models.is_gguf(m.source):  # dequantized at resolve; the cell checks its tokenizer once loaded
        return None, False
    local = Path(m.source).expanduser() / "config.json"
    if local.exists():
        return json.loads(local.read_text()), False
    if m.architecture:
        return json.loads(models.architecture_path(m.architecture).read_text()), False
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
    """(tokens the cell's tokenizer can emit, where that tokenizer comes from), as qbench.models picks it.
    None for a Hub tokenizer not on disk yet: preflight does not download; the cell checks it after loading."""
    from qbench import tiny

    from qbench.models import is_gguf

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


# ----------------------------------------------------------------------------------------------- dirs
def check_dirs(cfg: Any) -> None:
    from qbench.measure.gpu_state import lock_dir
    from qbench.store import check_writable

    check_writable(Path(cfg.run.runs_dir), key="run.runs_dir")
    check_writable(Path(cfg.run.cache_dir).expanduser(), key="run.cache_dir")
    check_writable(lock_dir(), key="GPU slot locks (QBENCH_LOCK_DIR)")


def check_cell(cfg: Any) -> None:
    """Raise ConfigError (one line) when the cell cannot run as configured."""
    check_method(cfg)
    check_schema_keys(cfg)
    check_eval(cfg)
    check_model(cfg)
    check_method_widths(cfg)
    check_method_device(cfg)


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


# ----------------------------------------------------------------------------------------------- eval
def check_eval(cfg: Any) -> None:
    """The cell's tasks against the task table, and offline, against the files under eval.data_dir."""
    from qbench.evaluate import tasks

    tasks.check(cfg.eval)


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
    from qbench import models

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
