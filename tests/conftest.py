"""Test tiers that skip themselves where this machine cannot run them, decided in one place.

pyproject.toml declares the markers. Here:
- ``gpu``: skipped where torch sees no CUDA device (torch is imported only when a ``gpu`` test was collected, so a
  run of the report tests alone does not pay for it);
- ``browser``: skipped where Debian's chromium (``$QBENCH_CHROMIUM``, default /usr/bin/chromium) is absent.
``slurm`` tests skip through tests/test_slurm.py's ``partition`` fixture, which asks the cluster itself and fails
instead under QBENCH_REQUIRE_SLURM=1. ``slow`` only selects: ``make test-fast`` leaves it out.
"""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]  # tests/test_conftest.py runs these hooks in a throw-away test tree

GPU_REASON = "needs a CUDA GPU"


def chromium_path() -> str:
    """Read at collection, not import, so that a run (or a test of this file) can point it elsewhere."""
    return os.environ.get("QBENCH_CHROMIUM", "/usr/bin/chromium")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not _cuda_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=GPU_REASON))
    browser = [item for item in items if item.get_closest_marker("browser")]
    chromium = chromium_path()
    if browser and not os.path.exists(chromium):
        for item in browser:
            item.add_marker(pytest.mark.skip(reason=f"{chromium} not installed (apt-get install -y chromium)"))
