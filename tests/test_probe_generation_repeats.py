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


@pytest.mark.slow  # two interpreters, ~10 s
def test_a_trained_model_folder_with_prompts_cut_from_real_text(tmp_path):
    from qbench.load import tiny

    folder = tiny.build(tmp_path / "model")
    text = ROOT / "qbench" / "data" / "fixtures" / "gsm8k" / "train.jsonl"
    args = ["--device", "cpu", "--pretrained", str(folder), "--text", str(text), "--batch", "2", "--prompt", "16:40",
            "--new-tokens", "4", "--repeats", "2"]
    a = probe("run", "A", *args, out=tmp_path / "out")
    assert "prompts" in a and "in-process repeats equal to the first: [True]" in a
    saved = torch.load(tmp_path / "out" / "tokens_A.pt")
    assert saved["tokens"].shape == (2, 4) and saved["lengths"][0] <= 40

    # the prompts are the text's tokens, not random ids: a text too short for the longest prompt is refused
    short = tmp_path / "short.jsonl"
    short.write_text('{"question": "1+1?", "answer": "2"}\n')
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_generation_repeats.py"), "run", "A",
                           *args[:4], "--text", str(short), *args[6:], "--out", str(tmp_path / "o2")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0 and "fewer than the longest prompt" in proc.stderr
