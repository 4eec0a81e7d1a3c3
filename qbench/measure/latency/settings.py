"""The bench keys as latency reads them: qbench.config.BenchConfig's fields, typed by its schema, with the values
that depend on others resolved once. No key is declared here: a key added to BenchConfig is a Settings field and,
unless it is in NOT_RECORDED, a key of result.json's ``latency.settings``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

from qbench.config import BenchConfig
from qbench.measure import decode_paths

# bench keys that do not shape a latency figure: whether latency runs, where (recorded as latency.device), the CPU
# pinning (recorded with the environment), and spec overrides (the spec used is recorded as latency.gpu_spec)
NOT_RECORDED = ("enabled", "device", "cpu_affinity", "gpu_spec_overrides")


@dataclass
class Settings(BenchConfig):
    """BenchConfig's keys after validation, for the latency loops. From :meth:`from_bench` only: it resolves
    ``compiled_batch_sizes`` (null: all batch sizes), ``max_warmup_runs`` (at least ``warmup_runs``) and
    ``decode_paths`` (the registry's run order: a path that replays another's step runs after it)."""

    @classmethod
    def from_bench(cls, bench_cfg: Any) -> Settings:
        """``bench_cfg``: the composed ``cfg.bench`` (or a BenchConfig), typed through BenchConfig's schema so that
        an int where a float is declared (``max_time_per_figure_s: 10``) is recorded as the schema says."""
        from omegaconf import OmegaConf

        node = OmegaConf.merge(OmegaConf.structured(BenchConfig), bench_cfg)
        plain: Dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
        values = {f.name: plain[f.name] for f in fields(BenchConfig)}
        values["decode_paths"] = decode_paths.ordered(values["decode_paths"])
        values["compiled_batch_sizes"] = list(values["compiled_batch_sizes"] or values["batch_sizes"])
        values["max_warmup_runs"] = max(values["warmup_runs"], values["max_warmup_runs"])
        values["gpu_spec_overrides"] = dict(values["gpu_spec_overrides"] or {})
        return cls(**values)

    def cap(self, path: Optional[str] = None) -> Tuple[str, Optional[float]]:
        """(bench key, seconds) of the time cap of a figure of decode ``path`` (None: a prefill figure): the path's
        own cap (its module's TIME_CAP_KEY) where set, else bench.max_time_per_figure_s."""
        own = getattr(decode_paths.get(path), "TIME_CAP_KEY", None) if path is not None else None
        if own is not None and getattr(self, own) is not None:
            return own, getattr(self, own)
        return "max_time_per_figure_s", self.max_time_per_figure_s

    def loop(self, path: Optional[str] = None) -> Dict[str, Any]:
        """timing.repeat's keywords for one figure of decode ``path`` (None: prefill). Prefill and the compiled
        paths have a transient after their first call (GPU clocks ramp up over the first prefill calls; a compiled
        path keeps speeding up for a few calls after its compile), so they warm up until steady, up to
        max_warmup_runs. An uncompiled decode path has none, and on a noisy host "still faster" is a coin toss that
        costs seconds a figure: it warms up warmup_runs only."""
        steady = path is None or decode_paths.compiled(path)
        return dict(warmup_runs=self.warmup_runs,
                    max_warmup_runs=self.max_warmup_runs if steady else self.warmup_runs,
                    steady_pct=self.warmup_steady_pct, min_repeats=self.min_repeats, max_repeats=self.max_repeats,
                    min_duration_s=self.min_duration_s, target_ci_pct=self.target_ci_pct,
                    max_time_s=self.cap(path)[1])

    def record(self) -> Dict[str, Any]:
        """result.json's ``latency.settings``: every bench key that shapes a figure, as resolved."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_RECORDED}
