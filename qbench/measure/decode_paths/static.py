"""``static``: ``generate`` with the static cache, whose decode step transformers compiles (to CUDA graphs on a
GPU). Its first generate at a batch size compiles the step; later ones reuse it."""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from qbench.measure.decode_paths import _generate

LABEL = "static"
DESCRIPTION = "generate, compiled"
ORDER = 20
COMPILED = True
FIRST_CALL_COMPILES = True  # the first static generate at a batch size is where torch.compile works


def unsupported_reason(t: Any) -> Optional[str]:
    return _generate.compiled_generate_unsupported(t)


def prepare(t: Any, s: Any, ids: Any, mask: Any, compile_limit: Callable[[], Any]) -> Callable[[], List[float]]:
    def run() -> List[float]:
        return _generate.generate_timed(t.model, ids, mask, s.new_tokens, "static", t.device, t.pad_token_id,
                              t.compile_config)["steps_s"]

    return run
