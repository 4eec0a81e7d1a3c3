"""A cell's identity: every setting that changes its figures, flat, and a content hash of it. Only a stored result
of the same identity counts as done (qbench.store.rerun); content hashes also name caches."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Optional

from qbench.store.redaction import redact

# A cell's identity: every setting that changes its figures. model.*, method.*, bench.* and eval.* (quality and
# perplexity included) are in it but for the names and the description (they label a cell, the cell id already
# holds the names); run.* is bookkeeping (where results go, whether to rerun, time limits), except the baseline a
# quality cell is compared with. run.inject_failure is not in it: a cell it fails is an error row, rerun anyway.
# Library versions are not in it: they are recorded in every result (environment.versions) and an upgrade of
# torch does not make a stored figure wrong for the settings it was measured with; run.force=true remeasures.
IDENTITY_SECTIONS = ("model", "method", "bench", "eval")
IDENTITY_LABELS = ("model.name", "method.name", "method.description")


def _free_dict_keys() -> frozenset:
    """Keys of the typed schema whose value is a dict of free keys (config_overrides, num_fewshot, ...): one
    setting each, compared whole, so a key added to such a dict counts as a change."""
    import dataclasses
    import typing

    from qbench import config

    out = set()

    def walk(schema: type, prefix: str) -> None:
        for f in dataclasses.fields(schema):
            hint = typing.get_type_hints(schema)[f.name]
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif typing.get_origin(hint) is dict:
                out.add(f"{prefix}{f.name}")

    for section, schema in (("model", config.ModelConfig), ("bench", config.BenchConfig), ("eval", config.EvalConfig)):
        walk(schema, f"{section}.")
    return frozenset(out)


def _flatten(node: Any, prefix: str, out: Dict[str, Any], free: frozenset) -> None:
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and value and path not in free:
            _flatten(value, path, out, free)
        else:
            out[path] = value


def identity(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """{"hash": 16 hex digits, "settings": {dotted key: value}} of a cell's plain config dict (result["config"])."""
    free = _free_dict_keys()
    settings: Dict[str, Any] = {}
    for section in IDENTITY_SECTIONS:
        _flatten(cfg_dict.get(section) or {}, section, settings, free)
    for key in IDENTITY_LABELS:
        settings.pop(key, None)
    run = cfg_dict.get("run") or {}
    if settings.get("eval.quality.enabled"):
        settings["run.baseline_method"] = run.get("baseline_method")
    # as result.json will hold it: tuples are lists, a secret's value redacted (the stored side is, too)
    settings = redact(json.loads(json.dumps(settings, default=str)))
    return {"hash": content_hash(settings), "settings": settings}


def changed_settings(result: Dict[str, Any], current: Dict[str, Any]) -> Optional[Dict[str, tuple]]:
    """{key: (stored value, current value)} for each setting of ``current`` (an identity) that differs from the
    stored result's; None when the result records no settings at all.

    A result written before results carried an identity is compared through its ``config``. A key on one side
    only is a setting that qbench added or dropped since the result was written, not a change made by the user:
    it is left out, so an upgrade of qbench does not remeasure every stored cell."""
    stored = (result.get("identity") or {}).get("settings")
    if stored is None:
        if not isinstance(result.get("config"), dict):
            return None
        stored = identity(result["config"])["settings"]
    now = current["settings"]
    return {k: (stored[k], now[k]) for k in sorted(now.keys() & stored.keys()) if stored[k] != now[k]}


def describe_changes(changes: Dict[str, tuple], most: int = 3, width: int = 60) -> str:
    """"bench.batch_sizes [1] -> [1, 4], ..." for a log line: the first ``most`` keys, each value cut to ``width``."""
    def short(v: Any) -> str:
        text = json.dumps(v, default=str)
        return text if len(text) <= width else text[: width - 1] + "\u2026"

    parts = [f"{k} {short(old)} -> {short(new)}" for k, (old, new) in list(changes.items())[:most]]
    more = len(changes) - most
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def content_hash(obj: Any, length: int = 16) -> str:
    """A stable hex digest of a JSON-able object (key order does not matter): names caches by content."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
