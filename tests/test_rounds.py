"""run.rounds: interleaved passes over the sweep, and each cell's figures combined over its rounds."""
from __future__ import annotations

import json

import pytest

from qbench.measure import stats
from qbench.run import cli, rounds
from qbench.store.jsonio import read_result, write_result


def _result(tps_values, ttft_values, status="ok", bound=1000.0):
    tps = stats.summarize(tps_values, "tokens/s")
    return {
        "status": status, "cell": "m__bf16", "pid": 1, "warnings": ["w"], "timings": {"latency_s": 10.0},
        "error": None if status == "ok" else {"class": "oom", "message": "out of memory"},
        "metrics": {"memory": {"weight_bytes_measured": 1}, "accuracy": {"mmlu": 0.5}, "latency": {
            "prefill": [{"batch_size": 1, "prompt_tokens": 8, "ttft_ms": stats.summarize(ttft_values, "ms"),
                         "tokens_per_s": None, "compute_bound_ms": 1.0}],
            "decode": [{"decode_path": "static", "batch_size": 1, "prompt_tokens": 8, "tokens_per_s": tps,
                        "per_token_ms": stats.summarize([1e3 / v for v in tps_values], "ms"),
                        "bandwidth_bound_tokens_per_s": bound, "bandwidth_bound_fraction": tps["p50"] / bound}],
        }},
    }


def test_between_round_spread_dominates_a_drifting_node(tmp_path):
    """Three rounds, each steady within (±0.5 %) but at 100, 110 and 120 tok/s: the figure is the median of the
    rounds (110) and its uncertainty is half their range (±9.1 %), named as between-round."""
    cell = tmp_path / "m__bf16"
    for k, level in enumerate((100.0, 110.0, 120.0), 1):
        values = [level * f for f in (0.995, 1.0, 1.0, 1.0, 1.0, 1.005)]
        write_result(rounds.round_dir(cell, k), _result(values, [10.0, 10.0, 10.0, 10.0, 10.0, 10.0]))
    out = rounds.combine(cell, 3)
    assert out == read_result(cell)
    d = out["metrics"]["latency"]["decode"][0]
    tps = d["tokens_per_s"]
    assert tps["p50"] == pytest.approx(110.0) and tps["n"] == 18
    assert tps["rounds"]["medians"] == pytest.approx([100.0, 110.0, 120.0])
    assert tps["rounds"]["dominated_by"] == "between-round"
    assert tps["median_ci"]["half_width_pct"] == pytest.approx(100 * 10 / 110)
    assert d["bandwidth_bound_fraction"] == pytest.approx(0.11)  # follows the combined median
    assert d["precision"]["rounds"] == 3 and d["precision"]["dominated_by"] == "between-round"
    assert out["rounds"]["n"] == 3 and out["round"] is None
    assert out["metrics"]["accuracy"] == {"mmlu": 0.5}  # round 1's
    assert "round 2: w" in out["warnings"]


def test_within_round_ci_dominates_noisy_steady_rounds(tmp_path):
    cell = tmp_path / "m__bf16"
    noisy = [80.0, 120.0, 90.0, 110.0, 100.0, 100.0]
    for k in (1, 2):
        write_result(rounds.round_dir(cell, k), _result(noisy, [10.0, 11.0, 12.0, 10.0, 11.0, 12.0]))
    d = rounds.combine(cell, 2)["metrics"]["latency"]["decode"][0]["tokens_per_s"]
    assert d["rounds"]["dominated_by"] == "within-round" and d["rounds"]["between_half_width_pct"] == 0.0
    assert d["median_ci"]["half_width_pct"] == pytest.approx(stats.median_ci(sorted(noisy))["half_width_pct"])


def test_no_combined_result_until_every_round_has_one_and_a_failed_round_is_an_error(tmp_path):
    cell = tmp_path / "m__bf16"
    write_result(rounds.round_dir(cell, 1), _result([100.0] * 6, [10.0] * 6))
    assert rounds.combine(cell, 2) is None and read_result(cell) is None  # the sweep resumes round 2 later
    write_result(rounds.round_dir(cell, 2), _result([100.0] * 6, [10.0] * 6, status="error"))
    out = rounds.combine(cell, 2)
    assert out["status"] == "error" and out["error"]["message"] == "round 2: out of memory"


def test_rounds_run_as_interleaved_passes(tmp_path, monkeypatch):
    """Each round is a pass over the whole sweep (every cell once, in a fresh process) before the next starts;
    accuracy and quality are measured in the first only."""
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv[3:]) or 0)
    dirs = cli.CellDirs([tmp_path / "a", tmp_path / "b"])
    dirs.rounds = 3
    assert cli.run_rounds(["-m", "method=fp16,bf16", "run.rounds=3"], dirs, 0.0) == 1  # no cell wrote a result
    assert calls == [["-m", "method=fp16,bf16", "run.rounds=3", "run.round=1"],
                     ["-m", "method=fp16,bf16", "run.rounds=3", "run.round=2", "eval.enabled=false"],
                     ["-m", "method=fp16,bf16", "run.rounds=3", "run.round=3", "eval.enabled=false"]]


def test_round_results_live_below_the_cell(tmp_path):
    from qbench.store.layout import cell_dir

    cfg = {"model": {"name": "m"}, "method": {"name": "bf16"}, "run": {"runs_dir": str(tmp_path), "sweep": "s", "round": 2}}
    assert cell_dir(cfg) == tmp_path / "s" / "m__bf16" / "rounds" / "2"
    assert cell_dir(cfg, "fp32") == tmp_path / "s" / "m__fp32" / "rounds" / "2"
    cfg["run"]["round"] = None
    assert cell_dir(cfg) == tmp_path / "s" / "m__bf16"
    json.dumps(str(cell_dir(cfg)))


def test_bad_round_counts_are_one_line_errors(tmp_path):
    from qbench.config import register_configs
    from qbench.errors import ConfigError

    register_configs()
    with pytest.raises(ConfigError, match="run.rounds: 0 must be at least 1"):
        cli.preflight(["model=tiny", "run.rounds=0", f"run.runs_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="run.round: 4 is not one of 1..3"):
        cli.preflight(["model=tiny", "run.rounds=3", "run.round=4", f"run.runs_dir={tmp_path}"])
    dirs = cli.preflight(["-m", "model=tiny", "method=fp32,bf16", "run.rounds=3", f"run.runs_dir={tmp_path}"])
    assert dirs.rounds == 3 and not dirs.in_round and [d.name for d in dirs] == ["tiny__fp32", "tiny__bf16"]
