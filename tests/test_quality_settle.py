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


@pytest.mark.slow  # two or three qbench commands, each with its cell processes
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
    # the cell's budget splits its quality phase (the baseline's comparison came later, outside the cell)
    r = json.loads((sweep / "tiny__fp32" / "result.json").read_text())
    budget = r["timings"]["budget"]
    assert "quality_s" not in budget and r["timings"]["quality_s"] > 0
    assert budget["quality_model_calls_s"] > 0 and budget["quality_write_s"] > 0 and budget["quality_text_s"] > 0
    assert sum(v for k, v in budget.items() if k.startswith("quality_")) == pytest.approx(r["timings"]["quality_s"],
                                                                                          abs=0.01)


def _undo(tmp_path: Path, sweep: Path) -> Path:
    """A copy of the sweep as an older qbench left it: the earlier cell without its comparison."""
    copy = tmp_path / "runs" / "s"
    shutil.copytree(sweep, copy)
    path = copy / "tiny__bf16" / "result.json"
    r = json.loads(path.read_text())
    r["metrics"]["quality"].update(comparison=None, comparison_source=None)
    path.write_text(json.dumps(r))
    return copy


@pytest.mark.slow  # two or three qbench commands, each with its cell processes
def test_an_unreadable_logprob_file_is_a_warning_and_leaves_the_exit_status(two_commands, tmp_path):
    _, sweep, _, _ = two_commands
    copy = _undo(tmp_path, sweep)
    (copy / "tiny__bf16" / quality.LOGPROBS_FILE).write_bytes(b"not a zip")
    proc = _qbench(tmp_path, tmp_path / "runs", "method=fp32")  # skipped: done; the end tries the comparison
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "quality comparison not made" in ln]
    assert len(warnings) == 1 and "tiny__bf16" in warnings[0] and "unreadable" in warnings[0], proc.stderr[-3000:]
    assert _quality(copy, "tiny__bf16")["comparison"] is None
    assert "0 of 1 late quality comparison(s) made" in proc.stdout


@pytest.mark.slow  # a qbench command of two rounds: three commands and four cell processes
def test_rounds_settle_after_combining(tmp_path):
    """The compared cell runs first in round 1; the rounds are combined from round 1, then the comparison made."""
    proc = _qbench(tmp_path, tmp_path / "runs", "method=bf16,fp32", "run.rounds=2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sweep = tmp_path / "runs" / "s"
    assert _quality(sweep, "tiny__bf16")["comparison_source"] == "sweep_end"
    assert proc.stdout.count("late quality comparison(s) made") == 1  # by the command, not by each round's pass
    assert _quality(sweep / "tiny__bf16" / "rounds" / "1", ".")["comparison"] is None  # the round's own stays


FIXTURE = Path(__file__).parent / "fixtures" / "runs" / "demo" / "tiny__bf16" / "result.json"


@pytest.fixture(scope="module")
def older_folder(tmp_path_factory):
    """A sweep folder as an older qbench left it: nf4 measured before its fp32 baseline, its comparison null."""
    import torch
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.load import tiny

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    base = LlamaForCausalLM(cfg).eval()
    cand = LlamaForCausalLM(cfg).eval()
    cand.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
    qcfg = OmegaConf.create({"ctx_tokens": 64, "max_windows": 3, "batch_size": 1, "coverage": 0.999,
                             "max_kept": None})
    tok, text = tiny.build_tokenizer(), tiny.TINY_TEXT.read_text()[:20000]
    root = tmp_path_factory.mktemp("older") / "q"
    meta = {"source": "builtin:tiny_text", "model_config_hash": "small"}
    for method, model, baseline_file in (("nf4", cand, root / "small__fp32" / quality.LOGPROBS_FILE),
                                         ("fp32", base, None)):
        q = quality.run(model, tok, qcfg, text=text, cell_dir=root / f"small__{method}", baseline_file=baseline_file,
                        meta=meta)
        r = json.loads(FIXTURE.read_text())
        r.update(cell=f"small__{method}", model="small", method=method, status="ok")
        r["metrics"]["quality"] = {**q, "baseline_method": "fp32"}
        (root / f"small__{method}" / "result.json").write_text(json.dumps(r))
    return root


def test_an_older_runs_folder_is_settled_by_its_command_and_the_report_line_names_it(older_folder, tmp_path):
    copy = tmp_path / "q"
    shutil.copytree(older_folder, copy)
    assert _quality(copy, "small__nf4")["comparison"] is None
    assert late_quality.pending_comparisons(copy) == ["small__nf4"]
    line = late_quality.pending_line(copy)
    assert line is not None and f"python -m qbench.run.settle {copy}" in line and "\n" not in line
    with settle._cell_held(copy / "small__nf4") as held:  # a process measuring it again holds its lock
        assert held
        assert settle.settle_cell(copy, "small__nf4")[0] == "busy"
    assert _quality(copy, "small__nf4")["comparison"] is None
    assert settle.main([str(copy)]) == 0
    q = _quality(copy, "small__nf4")
    assert q["comparison_source"] == "sweep_end"
    # the same numbers the report computed from the two files before
    assert q["comparison"] == json.loads(json.dumps(quality.compare_later(copy / "small__nf4", copy / "small__fp32")))
    assert q["comparison"]["kl_divergence"]["mean"] > 0
    assert late_quality.pending_comparisons(copy) == [] and late_quality.pending_line(copy) is None
    assert settle.main([str(tmp_path / "nowhere")]) == 2


def test_files_made_on_other_tokens_are_one_warning_and_no_comparison(older_folder, tmp_path, capsys):
    copy = tmp_path / "q"
    shutil.copytree(older_folder, copy)
    src = quality.load(copy / "small__fp32" / quality.LOGPROBS_FILE)
    assert src is not None
    meta = {**src["meta"], "tokens_sha256": "0" * 64}  # the baseline scored another text
    data = {k: v for k, v in src.items() if k != "meta"}
    import numpy as np

    np.savez(copy / "small__fp32" / quality.LOGPROBS_FILE, meta=np.array(json.dumps(meta)), **data)
    line = settle.settle([copy])
    assert line is not None and line.startswith("qbench: 0 of 1 late quality comparison(s) made in ")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(err) == 1 and "small__nf4: quality comparison not made" in err[0] and "tokens_sha256" in err[0]
    assert _quality(copy, "small__nf4")["comparison"] is None


def test_the_report_names_the_settle_command_for_a_folder_with_pending_comparisons(older_folder, tmp_path, capsys):
    from qbench.report import cli as report_cli

    copy = tmp_path / "q"
    shutil.copytree(older_folder, copy)
    report_cli.main([str(copy), "--out", str(tmp_path / "site")])
    err = capsys.readouterr().err
    assert f"python -m qbench.run.settle {copy}" in err and "small__nf4" in err
    settle.main([str(copy)])
    capsys.readouterr()
    report_cli.main([str(copy), "--out", str(tmp_path / "site2")])
    assert "qbench.run.settle" not in capsys.readouterr().err
