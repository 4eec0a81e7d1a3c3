"""result.json's typed sections: one dataclass per section, read with :meth:`Section.from_dict` and written back
with :meth:`Section.to_dict`. A key a section does not declare (an older qbench's, a method's own block) is kept
in ``extra``, and a key that was absent stays absent (``ABSENT``, not None: null is a measurement's "missing"), so
every stored result round-trips to the same dict (tests/test_result_schema.py)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

SCHEMA_VERSION = 1  # changes when a field of result.json changes meaning


class _Absent:
    """A key the stored dict did not have: left out again by to_dict."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


@dataclass
class Section:
    extra: Dict[str, Any] = field(default_factory=dict)  # keys this section does not declare, kept as they were

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Any:
        hints = typing.get_type_hints(cls)
        known, extra = {}, {}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key, value in data.items():
            if key not in names:
                extra[key] = value
                continue
            sub = next((a for a in typing.get_args(hints[key]) if a is not type(None)), hints[key])  # Optional[X]
            if isinstance(sub, type) and issubclass(sub, Section) and isinstance(value, dict):
                value = sub.from_dict(value)
            known[key] = value
        return cls(extra=extra, **known)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is ABSENT:
                continue
            out[f.name] = value.to_dict() if isinstance(value, Section) else value
        out.update(self.extra)
        return out


@dataclass
class Latency(Section):
    settings: Any = ABSENT  # the knobs the figures were measured with (bench.*)
    prefill: Any = ABSENT  # {batch size: timed figures of the prompt's forward pass}
    decode: Any = ABSENT  # {decode path: {batch size: timed figures of new tokens}}
    device: Any = ABSENT
    unsupported: Any = ABSENT
    one_time: Any = ABSENT


@dataclass
class Metrics(Section):
    memory: Any = ABSENT  # bytes: weights, peak, per-layer, bits per weight
    latency: Optional[Latency] = ABSENT
    accuracy: Any = ABSENT  # lm-eval: task -> score, stderr, n
    quality: Any = ABSENT  # vs the baseline: KL, top-1 agreement, perplexity


@dataclass
class Result(Section):
    """One cell's result.json. ``metrics`` is typed; the other sections are the plain JSON they hold."""

    schema_version: Any = ABSENT
    status: Any = ABSENT  # "ok" | "error"
    sweep: Any = ABSENT
    cell: Any = ABSENT  # qbench.store.layout.cell_id
    round: Any = ABSENT
    model: Any = ABSENT
    method: Any = ABSENT
    method_kind: Any = ABSENT
    config: Any = ABSENT
    identity: Any = ABSENT  # {"hash", "settings"}: qbench.store.identity
    environment: Any = ABSENT  # qbench.store.environment
    timings: Any = ABSENT  # seconds per step, and the budget whose parts sum to wall_time_s
    metrics: Optional[Metrics] = ABSENT
    warnings: Any = ABSENT
    error: Any = ABSENT  # {"class", "type", "message", "traceback", "phase"} or null
    finished_at: Any = ABSENT
    wall_time_s: Any = ABSENT
