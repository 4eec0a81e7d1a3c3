"""Bad input and offline mode: what every room may need, importing nothing from qbench.

``ConfigError`` is bad input: the user sees it as one line naming the culprit, before any work starts (a cell
that raises it records error class ``config``). The offline checks read the Hugging Face environment variables
only, so they answer the same in the sweep's process, in a cell and in a SLURM job.
"""
from __future__ import annotations

import os
from typing import Any

_TRUE = ("1", "true", "yes")


class ConfigError(ValueError):
    """Bad input: reported to the user as one line naming the culprit, before any work starts."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: nothing may be fetched from the Hub (models, tokenizers, configs)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in _TRUE


def datasets_offline() -> bool:
    """HF_DATASETS_OFFLINE is set: no dataset may be fetched."""
    return os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in _TRUE


def eval_offline(e: Any) -> bool:
    """Whether evaluation reads local data files instead of the Hub: ``eval.offline`` true / false, or with
    auto, whether either Hugging Face offline variable is set."""
    if str(e.offline).lower() == "true":
        return True
    if str(e.offline).lower() == "false":
        return False
    return hub_offline() or datasets_offline()
