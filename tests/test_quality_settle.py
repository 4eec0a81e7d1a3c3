"""A cell measured before its baseline gets its quality comparison at the end of the qbench command that measures
the baseline (qbench/run/settle.py), written into its result.json: the report reads result.json only."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.evaluate import quality
from qbench.run import settle
from qbench.store import late_quality
from qbench.store.layout import LOCK_FILE, attempt_file

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "bench.enabled=false", "eval=quality", "eval.quality.max_windows=2",
        "eval.quality.ctx_tokens=64", "run.baseline_method=fp32"]


def _qbench(tmp_path: Path, runs: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "QBENCH_LOCK_DIR": str(tmp_path / "locks")}
    return subprocess.run([sys.executable, "-m", "qbench", "-m", *TINY, *args, f"run.runs_dir={runs}",
                           "run.sweep=s"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _quality(sweep: Path, cell: str) -> dict:
    return json.loads((sweep / cell / "result.json").read_text())["metrics"]["quality"]


@pytest.fixture(scope="module")
def two_commands(tmp_path_factory):
    """The compared method in one command, its baseline in a second: the first cannot compare, the second's end
    does it for the first's cell."""
    tmp = tmp_path_factory.mktemp("settle")
    runs = tmp / "runs"
    first = _qbench(tmp, runs, "method=bf16")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    before = _quality(runs / "s", "tiny__bf16")
    second = _qbench(tmp, runs, "method=fp32")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    return tmp, runs / "s", before, second


def test_the_baselines_command_writes_the_comparison_into_the_earlier_cell(two_commands):
    _, sweep, before, second = two_commands
    assert before["role"] == "compared" and before["comparison"] is None
    q = _quality(sweep, "tiny__bf16")
    assert q["comparison_source"] == late_quality.SOURCE == "sweep_end"
    # the same numbers the report computed from the two files before
    assert q["comparison"] == json.loads(json.dumps(quality.compare_later(sweep / "tiny__bf16", sweep / "tiny__fp32")))
    assert q["comparison"]["kl_divergence"]["mean"] >= 0 and q["comparison"]["top1_agreement_pct"]["mean"] > 50
    assert "qbench: 1 of 1 late quality comparison(s) made in " in second.stdout
    # the summary counts the cells this command ran: the settled cell is neither ran nor its own
    assert "1 cells: ran 1, skipped 0, failed 0" in second.stdout
    assert late_quality.pending_comparisons(sweep) == [] and late_quality.pending_line(sweep) is None


def _undo(tmp_path: Path, sweep: Path) -> Path:
    """A copy of the sweep as an older qbench left it: the earlier cell without its comparison."""
    copy = tmp_path / "runs" / "s"
    shutil.copytree(sweep, copy)
    path = copy / "tiny__bf16" / "result.json"
    r = json.loads(path.read_text())
    r["metrics"]["quality"].update(comparison=None, comparison_source=None)
    path.write_text(json.dumps(r))
    return copy


def test_an_unreadable_logprob_file_is_a_warning_and_leaves_the_exit_status(two_commands, tmp_path):
    _, sweep, _, _ = two_commands
    copy = _undo(tmp_path, sweep)
    (copy / "tiny__bf16" / quality.LOGPROBS_FILE).write_bytes(b"not a zip")
    proc = _qbench(tmp_path, tmp_path / "runs", "method=fp32")  # skipped: done; the end tries the comparison
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "quality comparison not made" in ln]
    assert len(warnings) == 1 and "tiny__bf16" in warnings[0], proc.stderr[-3000:]
    assert _quality(copy, "tiny__bf16")["comparison"] is None
    assert "0 of 1 late quality comparison(s) made" in proc.stdout


def test_an_older_runs_folder_is_settled_by_its_command_and_the_report_line_names_it(two_commands, tmp_path):
    _, sweep, _, _ = two_commands
    copy = _undo(tmp_path, sweep)
    assert late_quality.pending_comparisons(copy) == ["tiny__bf16"]
    line = late_quality.pending_line(copy)
    assert line is not None and f"python -m qbench.run.settle {copy}" in line and "\n" not in line
    with settle._cell_held(copy / "tiny__bf16") as held:  # a process measuring it again holds its lock
        assert held
        assert settle.settle_cell(copy, "tiny__bf16") == "busy"
    assert settle.main([str(copy)]) == 0
    assert _quality(copy, "tiny__bf16") == _quality(sweep, "tiny__bf16")
    assert attempt_file(copy / "tiny__bf16", LOCK_FILE).is_file()
    assert settle.main([str(copy)]) == 0 and late_quality.pending_comparisons(copy) == []
    assert settle.main([str(tmp_path / "nowhere")]) == 2
