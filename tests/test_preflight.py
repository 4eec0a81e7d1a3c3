"""Bad input a new user gave the real `qbench` command (issue 16): one line naming the culprit, exit 2, nothing
written under runs/ -- for every Hydra spelling of the command line."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_pipeline import QBENCH, env

RANDOM_QWEN = ["model=qwen2_5_0_5b_instruct", "model.random_init=true", "+model.config_overrides.num_hidden_layers=1"]


def run(args, tmp_path, extra_env=None, timeout=300):
    e = env(tmp_path / "cache")
    e.update(extra_env or {})
    return subprocess.run(QBENCH + args, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, tmp_path, *needles):
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("qbench: error")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not (tmp_path / "runs").exists(), "preflight wrote under runs/"


@pytest.mark.parametrize("overrides,needle", [
    (["+bench.foo=1"], "bench.foo: unknown key"),
    # checked against the method's own schema (gptq's calibration block), and bf16 has no calibration at all
    (["method=gptq", "+method.calibration.num_sample=3"], "method.calibration.num_sample: unknown key"),
    (["method=gptq", "+method.group_sise=3"], "method.group_sise: unknown key (a '+' override or a YAML adds a key the schema does not have) (did you mean 'group_size'?)"),
    (["method=bf16", "+method.group_size=64"], "method.group_size: unknown key"),
    (["+foo=1"], "foo: unknown key"),
])
def test_unknown_plus_keys_fail_preflight(tmp_path, overrides, needle):
    assert_one_line_error(run(["model=tiny", *overrides], tmp_path), tmp_path, needle)


def test_unknown_config_override_key_is_checked_against_the_config_class(tmp_path):
    proc = run(["model=qwen2_5_0_5b_instruct", "model.random_init=true",
                "+model.config_overrides.num_hiden_layers=1"], tmp_path)
    assert_one_line_error(proc, tmp_path, "model.config_overrides.num_hiden_layers", "Qwen2Config",
                          "num_hidden_layers")


def test_config_overrides_that_would_be_ignored_fail(tmp_path):
    proc = run(["model=tiny", "+model.config_overrides.num_hidden_layers=1"], tmp_path)
    assert_one_line_error(proc, tmp_path, "model.config_overrides", "random_init")


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory):
    d = tmp_path_factory.mktemp("userconf")
    (d / "experiment").mkdir()
    (d / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny\n  - override /bench: quick\n"
        "run:\n  sweep: mine\nhydra:\n  sweeper:\n    params:\n      method: fp32,bf16\n")
    return d


@pytest.mark.parametrize("spelling", ["--config-dir={d}", "--config-dir {d}", "-cd {d}"])
def test_every_config_dir_spelling_goes_through_preflight(tmp_path, user_conf, spelling):
    flags = spelling.format(d=user_conf).split()
    proc = run(["-m", *flags, "experiment=mine", "bench.batch_sizes=[0]", f"run.runs_dir={tmp_path / 'runs'}"],
               tmp_path)
    assert_one_line_error(proc, tmp_path, "bench.batch_sizes: 0")


def test_user_experiment_from_config_dir_is_found_and_checked(tmp_path, user_conf):
    proc = run(["-m", "-cd", str(user_conf), "experiment=mine", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("# cell:") == 2 and "sweep: mine" in proc.stdout


def test_missing_config_dir_is_one_line(tmp_path):
    assert_one_line_error(run(["-m", "--config-dir", str(tmp_path / "nope"), "experiment=mine"], tmp_path),
                          tmp_path, "--config-dir")


def test_folder_with_only_config_json_has_no_tokenizer(tmp_path):
    src = tmp_path / "cfgonly"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 4096}))
    proc = run(["model=tiny", f"model.source={src}", "model.random_init=true", "model.name=x"], tmp_path)
    assert_one_line_error(proc, tmp_path, "model.source", "no tokenizer files")


def test_vocab_override_smaller_than_the_tokenizer_fails(tmp_path):
    proc = run([*RANDOM_QWEN, "+model.config_overrides.vocab_size=512", "eval=demo"], tmp_path)
    assert_one_line_error(proc, tmp_path, "2048 tokens", "512 rows")


def test_tokenizer_that_fits_passes_preflight(tmp_path, monkeypatch):
    from qbench.run.cli import preflight
    from qbench.run.preflight import register_configs

    register_configs()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dirs = preflight([*RANDOM_QWEN, "+model.config_overrides.vocab_size=4096", f"run.runs_dir={tmp_path / 'runs'}",
                      f"run.cache_dir={tmp_path / 'cache'}"])
    assert dirs == [tmp_path / "runs" / "default" / "qwen2_5_0_5b_instruct__bf16"]


def read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through file modes: a kernel file system refuses it
        return Path("/sys/qbench-read-only-cache")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d


def test_read_only_cache_fails_preflight(tmp_path):
    ro = read_only_dir(tmp_path)
    proc = run(["model=tiny", f"run.runs_dir={tmp_path / 'runs'}"], tmp_path, {"QBENCH_CACHE": str(ro)})
    assert_one_line_error(proc, tmp_path, "run.cache_dir", str(ro))


def test_cfg_with_multirun_prints_every_cell(tmp_path):
    proc = run(["-m", "experiment=demo", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.count("# cell:") == 6 and "method=gguf_q4_k_m" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_info_with_multirun_is_one_line(tmp_path):
    assert_one_line_error(run(["-m", "experiment=demo", "--info"], tmp_path), tmp_path, "-m")


def test_help_is_qbench_own_page(tmp_path):
    proc = run(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "powered by Hydra" not in out and "schema" not in out
    assert "method:" in out and "bnb_nf4" in out and "experiment:" in out and "demo" in out
    examples = [ln for ln in out.splitlines() if ln.strip().startswith("qbench ")]
    assert len(examples) >= 3
