"""Preflight checks that need several stages at once: a method's constraints against the model's shapes.

config.validate checks each group alone; here a method may look at the model it will be applied to, before
anything loads. A method module that defines ``check_widths(method_cfg, widths)`` is handed the input widths of
the model's quantizable linear layers, built on the meta device from the model's config.json (no weights, no
memory), and raises ConfigError naming the key when it cannot quantize them.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Dict, List

from qbench import methods


def check_cell(cfg: Any) -> None:
    """Raise ConfigError (one line) when the cell's method cannot be applied to the cell's model."""
    method = methods.get(cfg.method.kind)
    check = getattr(method, "check_widths", None)
    if check is None:
        return
    widths = linear_input_widths(cfg.model)
    if widths:
        check(cfg.method, widths, cfg.model.name)


def linear_input_widths(model_cfg: Any) -> Dict[int, List[str]]:
    """in_features -> names of the nn.Linear layers with it (lm_head excluded); {} when the config is not at hand."""
    from qbench import models

    try:
        config = models.config_dict(model_cfg)
    except (OSError, ValueError):
        return {}  # a Hub config that cannot be fetched here: the cell itself will say what is wrong
    return dict(_widths(json.dumps(config, sort_keys=True, default=str)))


@lru_cache(maxsize=16)
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
