"""Reading a sweep's results: every result.json loaded, checked against its shape and the typed result, and an
unreadable one turned into an error cell; the typed result (qbench.store.result) the report's tables and page read
each one through, and the accessors for what stays untyped (config, environment, a section's own keys)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, TypeVar, Union

from qbench.store import layout  # stdlib only, like rows: the report still builds on a laptop without torch
from qbench.store.result import ABSENT, Accuracy, Latency, Memory, Quality, Result, ResultTypeError

CV_WARN_DEFAULT = 0.05

# A result as the report holds it: the dict load_results gives (what the tests edit), or its typed result
ResultLike = Union[Result, Dict[str, Any]]
X = TypeVar("X")


def typed(r: ResultLike) -> Result:
    """The typed result of a loaded result.json (a Result as it is). Not strict: load_results has already turned
    a result with a declared field of the wrong type into an error cell."""
    return r if isinstance(r, Result) else Result.from_dict(r)


def present(x: Optional[X]) -> Optional[X]:
    """A typed field's value, None where the key was absent (ABSENT) as where it was null."""
    return None if x is ABSENT else x


def memory_of(res: Result) -> Optional[Memory]:
    return (res.metrics.memory or None) if res.metrics else None


def latency_of(res: Result) -> Optional[Latency]:
    return (res.metrics.latency or None) if res.metrics else None


def accuracy_of(res: Result) -> Optional[Accuracy]:
    return (res.metrics.accuracy or None) if res.metrics else None


def quality_of(res: Result) -> Optional[Quality]:
    return (res.metrics.quality or None) if res.metrics else None


def get(d: Any, *keys: Any, default: Any = None) -> Any:
    """Nested lookup that treats absent keys, nulls and wrong types alike: the value or ``default``."""
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return default
        if d is None:
            return default
    return d


def num(x: Any) -> Optional[float]:
    """A finite float or None (bools and strings are not measurements)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# Where a result holds an object (dict) or a list: a valid-JSON file with another type there is unreadable.
RESULT_SHAPE = {
    ("metrics",): dict, ("metrics", "memory"): dict, ("metrics", "latency"): dict, ("metrics", "accuracy"): dict,
    ("metrics", "latency", "prefill"): list, ("metrics", "latency", "decode"): list,
    ("metrics", "latency", "one_time"): dict, ("metrics", "latency", "unsupported"): list,
    ("metrics", "accuracy", "tasks"): dict, ("metrics", "accuracy", "items"): dict,
    ("metrics", "memory", "kv_cache_bytes_analytic"): list,
    ("environment",): dict, ("environment", "versions"): dict, ("environment", "gpus"): list,
    ("config",): dict, ("config", "model"): dict, ("config", "bench"): dict, ("config", "run"): dict,
    ("timings",): dict, ("source",): dict, ("method_info",): dict, ("error",): dict,
    ("warnings",): list, ("overrides",): list,
}
_TYPE_NAME = {dict: "an object", list: "a list"}


def shape_problem(r: Dict[str, Any]) -> Optional[str]:
    """Why a result's structure cannot be read (a field of the wrong JSON type), or None. Absent and null
    fields are fine: a missing measurement stays missing."""
    for keys, want in RESULT_SHAPE.items():
        d: Any = r
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        if d is not None and not isinstance(d, want):
            return f"{'.'.join(keys)} is {type(d).__name__} {json.dumps(d)[:40]}, expected {_TYPE_NAME[want]}"
    return None


def typed_problem(r: Dict[str, Any]) -> Optional[str]:
    """Why the typed result (qbench.store.result, the writer's own check) refuses ``r``: a declared field of the
    wrong type, named by its key; or None."""
    try:
        Result.from_dict(r, strict=True)
    except ResultTypeError as exc:
        return str(exc)
    return None


def unreadable(path: Path, reason: str) -> Dict[str, Any]:
    """The error cell that stands in for a result the report cannot read."""
    return {"status": "error", "error": {"class": "unreadable", "type": "unreadable", "message": f"{path}: {reason}"}}


def load_results(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Every runs/<sweep>/<cell>/result.json, sorted by cell directory.

    An unreadable file (not JSON, not an object, or a field of the wrong type) becomes an error cell (class
    "unreadable") with the reason, instead of vanishing from the report or stopping it: a cell that silently
    disappears looks like a cell that was never planned.
    """
    sweep_dir = Path(sweep_dir)
    results = []
    for path in layout.result_files(sweep_dir):
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(r, dict):
                raise ValueError("result.json is not a JSON object")
            problem = shape_problem(r) or typed_problem(r)
            if problem:
                r = {**unreadable(path, problem), "cell": r.get("cell") if isinstance(r.get("cell"), str) else None}
        except (OSError, ValueError) as e:
            r = unreadable(path, f"{type(e).__name__}: {e}")
        cell = str(r.get("cell") or path.parent.name)
        r["cell"] = cell
        model, method = layout.parse_cell_id(cell)
        r["model"] = str(r.get("model") or model)
        r["method"] = str(r.get("method") or method or "?")
        r.setdefault("sweep", sweep_dir.name)
        r["sweep"] = str(r["sweep"])
        r["_path"] = str(path)
        if r.get("status") not in ("ok", "error"):
            r["status"] = "error" if r.get("error") else "ok"
        results.append(r)
    # the report reads result.json only: a cell measured before its baseline gets its comparison at the
    # sweep's end (qbench.evaluate.quality), and until then its quality row shows no comparison
    return results


def is_random(r: ResultLike) -> bool:
    """Accuracy of this cell sits at chance: random weights, or the evaluation said so."""
    res = typed(r)
    acc = accuracy_of(res)
    return bool(res.random_weights) or bool(acc and acc.chance)


def is_demo(r: ResultLike) -> bool:
    return bool(get(typed(r).config, "model", "source") == "builtin:tiny")


def cv_threshold(r: ResultLike) -> float:
    return num(get(typed(r).config, "bench", "cv_warn_threshold")) or CV_WARN_DEFAULT

