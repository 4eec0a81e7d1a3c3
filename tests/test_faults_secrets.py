"""Secrets and Hydra's paths: nothing qbench or Hydra writes holds a secret's value (an override such as
``method.description=$HF_TOKEN`` included), and Hydra's own output (.hydra/, cli.log, multirun.yaml) stays
under run.runs_dir."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QBENCH = [sys.executable, "-m", "qbench"]
FAST = ["model=tiny", "bench=quick", "bench.batch_sizes=[1]", "bench.new_tokens=4", "bench.min_repeats=1",
        "bench.max_repeats=1", "bench.warmup_runs=0", "bench.prompt_tokens=[8]", "bench.decode_prompt_tokens=8",
        "bench.device=cpu"]
SECRET = "hf_Zq8sEcReTvAlUe42"


def _run(args, tmp_path, **env):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
         "QBENCH_LOCK_DIR": str(tmp_path / "locks"), "MY_HF_TOKEN": SECRET, **env}
    return subprocess.run(QBENCH + args, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600)


def _files_with(root: Path, text: str) -> list:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_a_secret_in_an_override_is_written_nowhere(tmp_path):
    runs = tmp_path / "runs"
    # fp32 measures (so Hydra's job files and logs are written); bf16 is already done and is skipped
    done = runs / "s" / "tiny__bf16"
    done.mkdir(parents=True)
    (done / "result.json").write_text(json.dumps({"status": "ok", "cell": "tiny__bf16"}))
    proc = _run(["-m", *FAST, "method=fp32,bf16", "run.sweep=s", f"run.runs_dir={runs}",
                 f"method.description=token {SECRET} here"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files_with(tmp_path, SECRET) == []
    assert SECRET not in proc.stdout + proc.stderr
    # what Hydra keeps is still there, redacted
    multirun = (runs / "s" / "multirun.yaml").read_text()
    assert "method.description=token <redacted> here" in multirun
    job = runs / "s" / "tiny__fp32" / ".hydra"
    assert "description: token <redacted> here" in (job / "config.yaml").read_text()
    assert "method.description=token\\ <redacted>\\ here" in (job / "overrides.yaml").read_text()  # Hydra's escapes
    assert "sweep:" in (job / "hydra.yaml").read_text()
    assert (runs / "s" / "tiny__fp32" / "cli.log").exists()


@pytest.mark.parametrize("override, key", [
    ("hydra.sweep.subdir=../../x", "hydra.sweep.subdir"),
    ("hydra.sweep.dir=OUTSIDE", "hydra.sweep.dir"),
])
def test_hydra_sweep_folders_outside_runs_are_refused_at_preflight(tmp_path, override, key):
    runs = tmp_path / "work" / "runs"
    override = override.replace("OUTSIDE", str(tmp_path / "elsewhere"))
    proc = _run(["-m", *FAST, "method=fp32", "run.sweep=s", f"run.runs_dir={runs}", override], tmp_path)
    assert proc.returncode == 2
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("qbench: error")]
    assert key in line and "outside run.runs_dir" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "elsewhere").exists() and not runs.exists()


def test_hydra_run_dir_outside_runs_is_refused_at_preflight(tmp_path):
    runs = tmp_path / "runs"
    proc = _run([*FAST, "method=fp32", f"run.runs_dir={runs}", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2
    assert "hydra.run.dir" in proc.stderr and "outside run.runs_dir" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_hydra_folders_inside_runs_still_run(tmp_path):
    """A subdir of the user's own under runs/ is fine: the check refuses only what leaves run.runs_dir."""
    from hydra import compose, initialize_config_dir

    from qbench.run import cli
    from qbench.run import preflight as pf

    pf.register_configs()
    with initialize_config_dir(config_dir=cli.conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"run.runs_dir={tmp_path}", "hydra.sweep.subdir=${model.name}/job_${hydra.job.num}"],
                      return_hydra_config=True)
    cli._check_hydra_dirs(cfg, multirun=True)
    cli._check_hydra_dirs(cfg, multirun=False)
