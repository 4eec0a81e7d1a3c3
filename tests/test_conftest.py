"""The tier skips of tests/conftest.py, run on a throw-away test tree: a `gpu` test skips with its reason where torch
sees no CUDA device and runs where it sees one; a `browser` test skips where chromium is absent; unmarked tests
are left alone. If the one place that skips GPU tests broke, every GPU test would fail on a CPU machine (or be
skipped on a GPU node)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch  # imported here, before pytester snapshots sys.modules: torch cannot be imported twice in a process

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = """
import pytest

@pytest.mark.gpu
def test_on_gpu():
    pass

@pytest.mark.browser
def test_in_browser():
    pass

def test_anywhere():
    pass
"""


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, cuda: bool, chromium: str):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("QBENCH_CHROMIUM", chromium)
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8").replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(test_tiers=TESTS)
    return pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning")


def test_gpu_and_browser_tests_skip_with_their_reason_on_a_bare_cpu(pytester, monkeypatch, tmp_path):
    result = _run(pytester, monkeypatch, cuda=False, chromium=str(tmp_path / "no-chromium"))
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*test_tiers.py:*: needs a CUDA GPU",
                                 f"*test_tiers.py:*: {tmp_path / 'no-chromium'} not installed (apt-get install -y chromium)"])


def test_gpu_and_browser_tests_run_where_the_machine_has_them(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, cuda=True, chromium=str(CONFTEST))  # any file that exists stands in
    result.assert_outcomes(passed=3)
