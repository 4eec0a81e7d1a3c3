"""The group-size check of every method whose quantization groups run along a layer's input dimension (awq,
hqq, torchao_int4wo): a group size that does not divide a layer's input width is refused at preflight with one
line, each method saying why it cannot take it (a failure minutes into quantization, a layer left unquantized)."""
from __future__ import annotations

from typing import Dict, List, Sequence


def check_group_divides(group_size: int, widths: Dict[int, List[str]], model_name: str, why: str,
                        candidates: Sequence[int] = ()) -> None:
    """ConfigError naming the first layer whose input width ``group_size`` (-1: whole rows) does not divide;
    ``why`` ends the sentence; ``candidates`` (the method's group sizes) are narrowed to those that fit."""
    from qbench.errors import ConfigError

    gs = int(group_size)
    bad = sorted(w for w in widths if gs != -1 and w % gs)
    if not bad:
        return
    fits = [g for g in candidates if g == -1 or all(w % g == 0 for w in widths)]
    hint = f"; group sizes that fit every layer: {', '.join(map(str, fits))}" if fits else ""
    raise ConfigError(f"method.group_size: {gs} does not divide the input width {bad[0]} of {model_name}'s layer "
                      f"{widths[bad[0]][0]}{why}{hint}")
