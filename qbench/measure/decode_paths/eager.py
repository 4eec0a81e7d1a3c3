"""``eager``: ``generate`` with the dynamic cache, stamped by a logits processor after each step's forward: the
figure users of the plain transformers API get."""
from __future__ import annotations

from typing import Any, Callable, List

from qbench.measure.decode_paths import _generate

LABEL = "eager"
DESCRIPTION = "generate"
ORDER = 10
COMPILED = False
FIRST_CALL_COMPILES = False
# Eager's step time is the host's Python: its own cap (bench.max_time_per_eager_figure_s) keeps it to the runs
# that give a CI, since more runs in one process narrow a CI that is not its real uncertainty across processes
TIME_CAP_KEY = "max_time_per_eager_figure_s"


def prepare(t: Any, s: Any, ids: Any, mask: Any, compile_limit: Callable[[], Any]) -> Callable[[], List[float]]:
    def run() -> List[float]:
        return _generate.generate_timed(t.model, ids, mask, s.new_tokens, "eager", t.device, t.pad_token_id,
                              t.compile_config)["steps_s"]

    return run
