"""Where lm-eval's seconds go in a cell, and lm-eval's built requests kept from one cell to the next.

:func:`eval_clock` splits an evaluation into building the task objects (``TaskManager.load``: reading the data,
57 task objects for MMLU), building the requests (``Task.build_all_requests``: every item's few-shot prompt) and
the model's calls (``loglikelihood`` / ``generate_until`` / ``loglikelihood_rolling``). On a CPU here, eval=quick
(57 × 20 MMLU items + 100 GSM8K, 5-shot) built its tasks in 3.8 s and its requests in 15.4 s per cell
(docs/time_budget.md): on a GPU, where a 135M model answers those items in seconds, that is most of the eval.

The requests depend only on the task files, the data, the few-shot count and seed, the limit and the generation
settings, never on the model: every cell of a sweep builds the very same ones. So they are kept, pickled with dill
(what lm-eval's own ``cache_requests`` uses), under ``<run.cache_dir>/lm_eval_requests/<key>.pkl``. lm-eval's own
request cache is not used: its key holds the task name and few-shot count only (not the data, the seed, the limit
or the generation settings), and with a limit it builds every item of the task first (all 14,042 MMLU prompts
for a 1,140-item run). Here the key is a hash of all of those; a changed data file or task YAML, another
lm-eval version, another seed makes another key, and a cache file that cannot be read is rebuilt. Offline only
(see accuracy._request_cache_dir). Same prompts either way, so the figures do not move: tests/test_task_cache.py.

lm-eval then tokenizes every log-likelihood request in every cell (``TemplateLM.loglikelihood``), while the GPU
waits: 27 % of MMLU's model-call time on the 8B shape on an H200. The token ids depend only on the requests and the
tokenizer, the same for every method of one model, so :func:`keep_encodings` keeps them too, under
``<cache>/encodings/<key>.pkl``, the key a hash of the tokenizer's serialized form (vocabulary, normalizer,
pre-tokenizer, post-processor), its special tokens, the lm-eval model's BOS settings, the library versions and
every request's text. A later cell hands lm-eval's ``_loglikelihood_tokens`` the very lists it would have built.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

LOG = logging.getLogger(__name__)
MODEL_CALLS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


class EvalClock:
    """Seconds and cache counts of one evaluation, filled by :func:`eval_clock`'s wrappers."""

    def __init__(self, cache: Optional[Path], seed: Any, data_dir: Optional[str]) -> None:
        self.cache = cache
        self.seed = seed  # lm-eval's few-shot seed (qbench passes eval.seed)
        self.data_dir = data_dir  # the offline data the tasks read
        self.seconds = {"tasks_s": 0.0, "requests_s": 0.0}
        # the model calls by request type: {"generate_until": {"s": 12.3, "requests": 64}, ...} (model_calls_s is
        # their sum); on a GPU a small model's MMLU scoring and GSM8K generation differ by an order of magnitude
        self.calls: Dict[str, Dict[str, float]] = {}
        self.hits = 0
        self.misses = 0
        self.encoding_hits = 0  # loglikelihood calls served from kept token ids, and calls tokenized and kept
        self.encoding_misses = 0
        # of the log-likelihood calls' seconds, those before the model scored anything: lm-eval tokenizing (a miss)
        # or the kept ids read (a hit); null where the ids are not kept (online, or a slow tokenizer)
        self.encoding_s: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return {**self.seconds, "model_calls_s": sum(c["s"] for c in self.calls.values()),
                "request_cache": {"dir": str(self.cache) if self.cache else None, "hits": self.hits,
                                  "misses": self.misses, "encoding_hits": self.encoding_hits,
                                  "encoding_misses": self.encoding_misses, "encoding_s": self.encoding_s},
                "model_calls": {name: dict(v) for name, v in self.calls.items()}}


def _timed(clock: EvalClock, key: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.seconds[key] += time.perf_counter() - t0
    return wrapper


def _timed_call(clock: EvalClock, name: str, fn: Any) -> Any:
    """A model call: its seconds and request count into calls[name]."""
    def wrapper(requests: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(requests, *args, **kwargs)
        finally:
            entry = clock.calls.setdefault(name, {"s": 0.0, "requests": 0})
            entry["s"] += time.perf_counter() - t0
            entry["requests"] += len(requests) if hasattr(requests, "__len__") else 0
    return wrapper


@contextlib.contextmanager
def eval_clock(task_manager: Any, lm: Any, cache: Optional[Path], out: Dict[str, Any], seed: Any = None,
               data_dir: Optional[str] = None) -> Iterator[EvalClock]:
    """Time lm-eval's task building, request building and model calls for the block (instance wrappers on
    ``task_manager`` and ``lm``; ``Task.build_all_requests`` wrapped on the class, put back on exit), and serve
    requests from ``cache`` when given. ``out["time_budget"]`` gets the seconds on exit."""
    from lm_eval.api.task import Task

    clock = EvalClock(cache, seed, data_dir)
    original_build = Task.build_all_requests
    task_manager.load = _timed(clock, "tasks_s", task_manager.load)
    if lm is not None and cache is not None:
        keep_encodings(lm, cache / "encodings", clock)  # inside the model call's clock below: its seconds count there
    for name in MODEL_CALLS:
        if lm is not None and hasattr(lm, name):
            setattr(lm, name, _timed_call(clock, name, getattr(lm, name)))

    def build(task: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        try:
            _build_or_load(clock, original_build, task, kwargs)
        finally:
            clock.seconds["requests_s"] += time.perf_counter() - t0

    Task.build_all_requests = build
    try:
        yield clock
    finally:
        Task.build_all_requests = original_build
        out.setdefault("time_budget", {}).update(clock.as_dict())


def _build_or_load(clock: EvalClock, original_build: Any, task: Any, kwargs: Dict[str, Any]) -> None:
    import dill

    if clock.cache is None:
        original_build(task, **kwargs)
        return
    path = clock.cache / f"{request_key(task, kwargs, clock)}.pkl"
    if path.is_file():
        try:
            task._instances = dill.loads(path.read_bytes())
            clock.hits += 1
            return
        except Exception as exc:  # a torn or foreign file: build again and overwrite it
            LOG.warning("request cache %s unreadable (%s: %s): building the requests again", path,
                        type(exc).__name__, exc)
    original_build(task, **kwargs)
    clock.misses += 1
    _keep(path, dill.dumps(task._instances), "request cache", "builds them again")


def tokenizer_key(lm: Any) -> Optional[str]:
    """What lm-eval's ``tok_encode`` on ``lm`` depends on, hashed; None where it cannot be told (a tokenizer with no
    serialized form, an lm-eval model without ``_loglikelihood_tokens``): such a model tokenizes every time."""
    import lm_eval
    import tokenizers
    import transformers

    tok = getattr(lm, "tokenizer", None)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not callable(getattr(lm, "_loglikelihood_tokens", None)):
        return None
    parts = {
        "lm": f"{type(lm).__module__}.{type(lm).__qualname__}",
        "tokenizer": f"{type(tok).__module__}.{type(tok).__qualname__}",
        "serialized": hashlib.sha256(backend.to_str().encode()).hexdigest(),
        "special_tokens": tok.special_tokens_map,
        "tokenizer_bos_eos": [getattr(tok, "add_bos_token", None), getattr(tok, "add_eos_token", None)],
        "lm_add_bos_token": getattr(lm, "add_bos_token", None),
        "prefix_token_id": getattr(lm, "prefix_token_id", None),
        "lm_backend": getattr(lm, "backend", None),
        "versions": [lm_eval.__version__, transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def keep_encodings(lm: Any, folder: Path, clock: EvalClock) -> None:
    """``lm.loglikelihood`` that reads the token ids of its requests from ``folder`` when another cell with the same
    tokenizer tokenized the same requests, else tokenizes as lm-eval does and keeps them. A file that cannot be
    read is tokenized again; one that cannot be written (a full disk) costs a warning, never the cell's figures."""
    tokenizer = tokenizer_key(lm)
    if tokenizer is None:
        return
    tokenize_and_score = lm.loglikelihood
    score = lm._loglikelihood_tokens
    clock.encoding_s = 0.0

    def loglikelihood(requests: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        digest = hashlib.sha256(tokenizer.encode())
        for request in requests:
            for text in request.args:
                digest.update(str(len(text)).encode() + b":" + text.encode() + b"\0")
        path = folder / f"{digest.hexdigest()[:32]}.pkl"
        kept = _read_encodings(path, requests)
        if kept is not None:
            clock.encoding_hits += 1
            clock.encoding_s = (clock.encoding_s or 0.0) + time.perf_counter() - t0
            return score(kept, *args, **kwargs)
        built: List[Any] = []

        def capture(new_requests: Any, *a: Any, **k: Any) -> Any:
            if not built:  # lm-eval has tokenized them all
                clock.encoding_s = (clock.encoding_s or 0.0) + time.perf_counter() - t0
            built.append(new_requests)
            return score(new_requests, *a, **k)

        own = vars(lm).get("_loglikelihood_tokens")  # an instance's own, where it had one; else the class's
        lm._loglikelihood_tokens = capture
        try:
            result = tokenize_and_score(requests, *args, **kwargs)
        finally:
            if own is None:
                del lm._loglikelihood_tokens
            else:
                lm._loglikelihood_tokens = own
        clock.encoding_misses += 1
        if len(built) == 1:
            _keep(path, _pack_encodings(built[0]), "encoding cache", "tokenizes again")
        return result

    lm.loglikelihood = loglikelihood


def _pack_encodings(new_requests: List[Any]) -> bytes:
    """lm-eval's ``[((context, continuation), context_ids, continuation_ids), ...]`` less the texts (the key holds
    them): each distinct context's ids once (MMLU's four choices share one), as int32 bytes."""
    import numpy as np

    index: Dict[bytes, int] = {}
    rows = []
    for _texts, context_ids, continuation_ids in new_requests:
        packed = np.asarray(context_ids, dtype=np.int32).tobytes()
        rows.append((index.setdefault(packed, len(index)), [int(i) for i in continuation_ids]))
    return pickle.dumps({"format": 1, "contexts": list(index), "rows": rows}, protocol=pickle.HIGHEST_PROTOCOL)


def _read_encodings(path: Path, requests: Any) -> Optional[List[Any]]:
    import numpy as np

    if not path.is_file():
        return None
    try:
        kept = pickle.loads(path.read_bytes())
        if kept.get("format") != 1 or len(kept["rows"]) != len(requests):
            raise ValueError(f"{len(kept['rows'])} requests kept, {len(requests)} asked")
        contexts = [np.frombuffer(c, dtype=np.int32).tolist() for c in kept["contexts"]]
        return [(tuple(request.args), list(contexts[i]), list(cont))
                for request, (i, cont) in zip(requests, kept["rows"])]
    except Exception as exc:  # a torn or foreign file: tokenize again and overwrite it
        LOG.warning("encoding cache %s unreadable (%s: %s): tokenizing again", path, type(exc).__name__, exc)
        return None


def _keep(path: Path, data: bytes, what: str, next_cell: str) -> None:
    """A cache file written for the next cells; one that cannot be (a full disk) costs a warning, not the cell."""
    try:
        _write_atomic(path, data)
    except OSError as exc:
        LOG.warning("%s %s not written (%s): the next cell %s", what, path, exc, next_cell)


def _write_atomic(path: Path, data: bytes) -> None:
    """Whole or not at all: two cells of a parallel sweep may write the same key at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def request_key(task: Any, kwargs: Dict[str, Any], clock: EvalClock) -> str:
    """Everything the built requests of one task depend on, hashed: the task's name, few-shot count and
    generation settings as lm-eval will use them, the build's own arguments (limit, chat template, ...), the
    few-shot seed, qbench's task files, the data files' contents and the lm-eval / datasets versions."""
    import datasets
    import lm_eval

    from qbench.evaluate.lm_eval_tasks import TASKS_DIR

    config = task.config
    plain = {k: v for k, v in kwargs.items() if k != "chat_template"}  # a callable; its use is apply_chat_template
    parts = {
        "task": config.task,
        "num_fewshot": config.num_fewshot,
        "generation_kwargs": config.generation_kwargs,
        "build": plain,
        "fewshot_seed": clock.seed,
        "tasks_dir": folder_digest(str(TASKS_DIR)),
        "data": folder_digest(str(clock.data_dir)) if clock.data_dir else None,
        "versions": [lm_eval.__version__, datasets.__version__],
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return f"{config.task}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


@cache
def folder_digest(folder: str) -> str:
    """sha256 over every file's relative path and contents (once per process: MMLU + GSM8K are ~13 MB)."""
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()
