"""A stored result stands for the settings it was measured with (issue 29, item 2): a cell re-run with any setting
that changes its figures is measured again, the old result kept as result.prev.json; bookkeeping keys (run.*)
do not count; results of an older qbench (no identity) are compared through their config; every skip hint is
true."""
from __future__ import annotations

import copy
import json

import pytest

from qbench.store import identity, jsonio, layout, rerun
from tests.test_pipeline import FAST, qbench


def cfg_dict(**changes):
    base = {
        "model": {"name": "tiny", "source": "builtin:tiny", "revision": None, "dtype": "float32", "random_init": False,
                  "config_overrides": {}, "seed": 0},
        "method": {"name": "hqq4", "kind": "hqq", "dtype": "bfloat16", "description": "4-bit", "group_size": 64,
                   "calibration": {"num_samples": 8}},
        "bench": {"batch_sizes": [1], "new_tokens": 4, "gpu_spec_overrides": {}},
        "eval": {"enabled": False, "num_fewshot": {}, "quality": {"enabled": False, "batch_size": 4}},
        "run": {"sweep": "s", "runs_dir": "runs", "force": False, "rerun_failed": False, "timeout_min": 120,
                "inject_failure": None, "baseline_method": "bf16", "round": None, "rounds": 1},
    }
    for key, value in changes.items():
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return base


def stored(tmp_path, cfg, status="ok", with_identity=True):
    result = {"status": status, "config": cfg, "error": None if status == "ok" else {"class": "exception"}}
    if with_identity:
        result["identity"] = identity.identity(cfg)
    jsonio.write_result(tmp_path, result)
    return result


@pytest.mark.parametrize("key,value", [
    ("bench.batch_sizes", [1, 4]),
    ("model.dtype", "bfloat16"),
    ("model.revision", "abc123"),
    ("model.random_init", True),
    ("model.config_overrides", {"num_hidden_layers": 1}),  # a key added inside a dict of free keys
    ("method.group_size", 128),
    ("method.calibration.num_samples", 16),  # a method's nested block
    ("eval.enabled", True),
    ("eval.num_fewshot", {"mmlu": 0}),
    ("eval.quality.batch_size", 1),
    ("bench.gpu_spec_overrides", {"H200": {"mem_bandwidth_gb_s": 4000}}),
])
@pytest.mark.parametrize("with_identity", [True, False], ids=["identity", "older-qbench-config-only"])
def test_a_setting_that_changes_figures_makes_the_cell_run_again(tmp_path, key, value, with_identity):
    stored(tmp_path, cfg_dict(), with_identity=with_identity)
    now = identity.identity(cfg_dict(**{key: value}))
    assert rerun.should_skip(tmp_path, False, False, now) is None
    changes = identity.changed_settings(jsonio.read_result(tmp_path), now)
    assert any(k == key or k.startswith(key + ".") for k in changes), changes


@pytest.mark.parametrize("key,value", [
    ("run.force", True), ("run.rerun_failed", True), ("run.timeout_min", 5), ("run.runs_dir", "elsewhere"),
    ("run.sweep", "t"), ("run.rounds", 3), ("method.description", "other words"), ("model.name", "tiny2"),
    ("run.baseline_method", "fp32"),  # only a quality cell compares with the baseline
    ("run.inject_failure", "oom:bf16"),  # a test hook: the cell it fails is an error row, rerun by rerun_failed
])
def test_bookkeeping_and_labels_do_not_count(tmp_path, key, value):
    stored(tmp_path, cfg_dict())
    assert rerun.should_skip(tmp_path, False, False, identity.identity(cfg_dict(**{key: value}))) == "ok"


def test_baseline_method_counts_for_a_quality_cell(tmp_path):
    stored(tmp_path, cfg_dict(**{"eval.quality.enabled": True}))
    now = identity.identity(cfg_dict(**{"eval.quality.enabled": True, "run.baseline_method": "fp32"}))
    assert list(identity.changed_settings(jsonio.read_result(tmp_path), now)) == ["run.baseline_method"]


def test_a_setting_qbench_added_since_is_not_a_change(tmp_path):
    old = cfg_dict()
    now = cfg_dict(**{"bench.max_compile_s": 300.0})  # a key the older result's config does not have
    stored(tmp_path, old, with_identity=False)
    assert rerun.should_skip(tmp_path, False, False, identity.identity(now)) == "ok"


def test_a_secret_in_a_setting_does_not_make_every_rerun_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijkl")
    cfg = cfg_dict(**{"model.revision": "x-hf_abcdefghijkl"})
    stored(tmp_path, cfg)  # written redacted
    assert "hf_abcdefghijkl" not in (tmp_path / "result.json").read_text()
    assert rerun.should_skip(tmp_path, False, False, identity.identity(copy.deepcopy(cfg))) == "ok"


def test_skip_hints_name_a_setting_that_really_reruns(tmp_path):
    stored(tmp_path, cfg_dict())
    assert "run.force=true" in rerun.skip_hint(tmp_path, "ok")
    assert "rerun_failed" not in rerun.skip_hint(tmp_path, "ok")  # it does not rerun an ok cell
    stored(tmp_path, cfg_dict(), status="error")
    assert "run.rerun_failed=true" in rerun.skip_hint(tmp_path, "error")
    jsonio.write_result(tmp_path, {"status": "ok"})  # a result from before results held their config
    assert rerun.should_skip(tmp_path, False, False, identity.identity(cfg_dict())) == "ok"
    assert "records no settings" in rerun.skip_hint(tmp_path, "ok")


def test_set_aside_keeps_the_previous_result(tmp_path):
    stored(tmp_path, cfg_dict())
    assert rerun.set_aside_previous(tmp_path) == tmp_path / layout.PREVIOUS_RESULT_FILE
    assert not (tmp_path / layout.RESULT_FILE).exists()
    assert json.loads((tmp_path / "result.prev.json").read_text())["status"] == "ok"
    assert rerun.set_aside_previous(tmp_path) is None


def test_rerun_with_other_batch_sizes_measures_again(tmp_path):
    """The issue's case, end to end: [1] then [1,2]; the second run measures, says why, keeps the first."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    args = [*FAST, "method=fp32", "run.sweep=s"]
    qbench(args, runs, cache)
    cell = runs / "s" / "tiny__fp32"
    first = json.loads((cell / "result.json").read_text())
    assert first["identity"]["settings"]["bench.batch_sizes"] == [1]

    again = qbench(args, runs, cache)  # same settings: skipped, with a hint that is true
    assert "skipped, already ok with these settings (run.force=true" in again.stdout + again.stderr
    assert not (cell / "result.prev.json").exists()

    proc = qbench([*args, "bench.batch_sizes=[1,2]"], runs, cache)
    out = proc.stdout + proc.stderr
    assert "bench.batch_sizes [1] -> [1, 2]" in out and "result.prev.json" in out, out[-3000:]
    assert "ran 1, skipped 0" in proc.stdout
    new = json.loads((cell / "result.json").read_text())
    assert [r["batch_size"] for r in new["metrics"]["latency"]["decode"]] == [1, 2]  # the new figures, measured
    assert new["identity"]["settings"]["bench.batch_sizes"] == [1, 2]
    assert json.loads((cell / "result.prev.json").read_text())["attempt_id"] == first["attempt_id"]
