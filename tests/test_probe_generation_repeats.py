"""scripts/probe_generation_repeats.py on the CPU: the same weights and prompts in two processes give the same
tokens and say so; other weights are named, not compared; the top-2 logit gaps are counted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--arch", "qwen2_5_0_5b_instruct", "--layers", "1", "--batch", "3", "--prompt", "8:24",
         "--new-tokens", "6", "--repeats", "2"]


def probe(*args, out):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_generation_repeats.py"), *args,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow  # three interpreters with torch and transformers, ~20 s
def test_two_processes_same_tokens_and_other_weights_named(tmp_path):
    a = probe("run", "A", *SMALL, out=tmp_path)
    assert "in-process repeats equal to the first: [True]" in a and "share_gap_below_bf16_spacing" in a
    probe("run", "B", *SMALL, out=tmp_path)
    assert "A vs B (deterministic False): 0 of 3 rows differ" in probe("compare", out=tmp_path)

    # a run whose tokens differ is reported row by row, with the first step that differs
    b = torch.load(tmp_path / "tokens_B.pt")
    b["tokens"][1, 4] += 1
    torch.save(b, tmp_path / "tokens_B.pt")
    assert "1 of 3 rows differ; first differing step per differing row: [4]" in probe("compare", out=tmp_path)

    b["checksum"] += 1.0  # other weights: the tokens are not compared
    torch.save(b, tmp_path / "tokens_B.pt")
    assert "B: other weights than A" in probe("compare", out=tmp_path)
