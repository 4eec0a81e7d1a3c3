"""The installed ``qbench`` console script, run from outside the checkout, as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "qbench"


@pytest.mark.skipif(not SCRIPT.exists(), reason="no qbench console script beside this Python (not pip-installed)")
def test_console_script_finds_qbench_sweeper_from_any_folder(tmp_path):
    """conf/config.yaml's default sweeper is qbench's own plugin: an editable install lets Python import it but
    not list it, so Hydra refused it ("Unknown plugin class") whenever the checkout was not on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", QBENCH_LOCK_DIR=str(tmp_path / "locks"))
    runs = tmp_path / "runs"
    proc = subprocess.run([str(SCRIPT), "-m", "model=tiny", "method=fp32", "bench.enabled=false", "eval=none",
                           f"run.runs_dir={runs}", "run.sweep=script"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Unknown plugin class" not in proc.stderr
    assert (runs / "script" / "tiny__fp32" / "result.json").is_file()
    assert (runs / "script" / "multirun.yaml").is_file()  # written by qbench's sweeper
