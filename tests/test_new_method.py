"""Adding a method is one module and one YAML (qbench/methods/__init__.py): a test writes both outside the tree,
puts the module's folder on the registry's package path (what adding a file to qbench/methods/ does) and the YAML
on Hydra's search path, and the method runs through preflight, a sweep with its baseline, the quality comparison
and the report with no other file touched."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIND = "rtn_sim"

METHOD = '''
"""A test's method: round-to-nearest on a symmetric per-output-channel grid of 2**bits levels, every decoder-layer
linear, the rounded weights kept in float32 (simulated quantization)."""
from dataclasses import dataclass

from omegaconf import MISSING

from qbench.config import MethodBase

EXTRA = None
LIBRARIES = ()


@dataclass
class Config(MethodBase):
    bits: int = MISSING  # bits of the grid


def validate(cfg):
    from qbench.errors import ConfigError

    if not 2 <= int(cfg.bits) <= 8:
        raise ConfigError(f"method.bits: {cfg.bits} must be 2 to 8")


def load(source, cfg, device_map):
    import torch

    from qbench.load.models import from_pretrained

    model = from_pretrained(source, device_map=device_map, dtype=torch.float32)
    top, rounded = 2 ** (int(cfg.bits) - 1) - 1, 0
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
                    w.copy_((w / scale).round().clamp(-top, top) * scale)
                    rounded += 1
    return model, {"rounded_linears": rounded}


def linear_weight_bytes(out_features, in_features, cfg):
    return out_features * in_features * 4  # float32 storage: rounding saves no bytes
'''

YAML = f'''# run with: qbench model=tiny method=rtn_sim4 hydra.searchpath=[file://<this folder's parent>]
defaults:
  - schema/{KIND}@_here_
  - _self_

name: rtn_sim4
kind: {KIND}
dtype: float32
bits: 4
description: "round-to-nearest 4-bit per channel, simulated in float32"
'''

SITE = '''
# Started with every qbench process of the test (sweep, fork server, cells): the registry's folder gains this one.
import qbench.methods
qbench.methods.__path__.append({plugin!r})
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_method")
    (root / "methods").mkdir()
    (root / "methods" / f"{KIND}.py").write_text(textwrap.dedent(METHOD))
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITE.format(plugin=str(root / "methods")))
    (root / "conf" / "method").mkdir(parents=True)
    (root / "conf" / "method" / "rtn_sim4.yaml").write_text(YAML)
    return root


def _qbench(plugin: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(plugin / "site"), str(REPO)]),
           "QBENCH_LOCK_DIR": str(plugin / "locks")}
    return subprocess.run([sys.executable, "-m", "qbench", "-m", "model=tiny", "bench=quick", "bench.device=cpu",
                           "bench.batch_sizes=[1]", "bench.prompt_tokens=[8]", "bench.decode_prompt_tokens=8",
                           "bench.new_tokens=4", "eval=quality", "eval.quality.max_windows=2",
                           "eval.quality.ctx_tokens=64", "run.baseline_method=fp32", "run.sweep=s",
                           f"run.runs_dir={plugin / 'runs'}", f"hydra.searchpath=[file://{plugin / 'conf'}]", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_a_new_method_module_runs_through_a_sweep_and_the_report(plugin, tmp_path):
    done = _qbench(plugin, "method=fp32,rtn_sim4")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    r = json.loads((plugin / "runs" / "s" / "tiny__rtn_sim4" / "result.json").read_text())
    assert r["status"] == "ok" and r["method_kind"] == KIND
    assert r["method_info"]["rounded_linears"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert r["config"]["method"]["bits"] == 4
    kl = r["metrics"]["quality"]["comparison"]["kl_divergence"]["mean"]
    assert 0 < kl < 1  # rounded to 4 bits: near the baseline, not equal to it
    assert r["metrics"]["latency"]["decode"][0]["tokens_per_s"]["p50"] > 0
    # the sweep's last line names the report command; it is the one run next
    assert done.stdout.rstrip().splitlines()[-1].startswith(f"qbench: report: qbench-report {plugin / 'runs' / 's'} ")
    out = tmp_path / "site"
    rep = subprocess.run([sys.executable, "-m", "qbench.report.cli", str(plugin / "runs" / "s"), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "rtn_sim4" in (out / "s" / "summary.csv").read_text()
    assert "round-to-nearest 4-bit per channel, simulated in float32" in (out / "s" / "index.html").read_text()


def test_a_new_methods_own_check_is_a_preflight_line(plugin):
    done = _qbench(plugin, "method=rtn_sim4", "method.bits=12")
    assert done.returncode == 2
    assert "method.bits: 12 must be 2 to 8" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout
