"""Preflight checks every input a cell will read before a model loads (issue 29, items 3 and 4): the model's
widths (the builtin tiny model's too), quality and perplexity corpora, calibration files, offline data rows, and
a model folder's config.json and safetensors headers. Each error is one line naming the key and the file."""
from __future__ import annotations

import pytest

from qbench import cli
from qbench.errors import ConfigError


def preflight_error(tmp_path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        cli.preflight([*overrides, f"run.runs_dir={tmp_path / 'runs'}"])
    line = str(info.value)
    assert "\n" not in line, line
    assert not (tmp_path / "runs").exists(), "preflight wrote under runs/"
    return line


# ----------------------------------------------------------------------------------------------- widths (item 3)
@pytest.mark.parametrize("method,group,needle", [
    ("hqq", 4096, "does not divide the input width 128"),
    ("hqq", 96, "does not divide the input width 128"),
])
def test_builtin_tiny_widths_are_checked(tmp_path, method, group, needle):
    line = preflight_error(tmp_path, "model=tiny", f"method={method}", f"method.group_size={group}")
    assert line.startswith("method.group_size:") and needle in line, line


def test_builtin_tiny_config_is_its_real_one():
    from omegaconf import OmegaConf

    from qbench import models, tiny

    cfg = OmegaConf.create({"source": "builtin:tiny", "config_overrides": {}, "architecture": None})
    assert models.config_dict(cfg) == tiny.TINY_LLAMA
