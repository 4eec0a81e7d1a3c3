"""llama.cpp's own tools beside the gguf method (qbench/methods/_llamacpp.py, docs/gguf.md): the pinned llama.cpp
commit and build flags in method_info; llama-perplexity / llama-imatrix / llama-quantize built once from the same
sdist (`make llama-tools`); qbench's KLD against llama-perplexity's on the same tokens (scripts/gguf_kld_check.py);
method.imatrix. The fast tests fake the sdist and the compiler; the slow ones need the tools built and skip
without them, saying how to build them."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qbench.errors import ConfigError
from qbench.load import weights
from qbench.methods import _llamacpp as lc

REPO = Path(__file__).resolve().parent.parent
SDIST_ROOT = f"llama_cpp_python-{lc.LLAMA_CPP_PYTHON}"


def _fake_sdist(path: Path, commit: str = lc.LLAMA_CPP_COMMIT[1]) -> Path:
    """A tar.gz laid out like llama-cpp-python's sdist: the converter files and the submodule's git HEAD."""
    files = {f"{SDIST_ROOT}/vendor/llama.cpp/convert_hf_to_gguf.py": "# converter\n",
             f"{SDIST_ROOT}/vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
             f"{SDIST_ROOT}/vendor/llama.cpp/CMakeLists.txt": "project(x)\n",
             f"{SDIST_ROOT}/.git/modules/vendor/llama.cpp/HEAD": commit + "\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache that nothing else finds the converter or the tools beside."""
    monkeypatch.delenv(lc.SOURCES_ENV, raising=False)
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lc, "CHECKOUT_CACHE", tmp_path / "checkout-cache")
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------------------
# 1. llama.cpp's commit and build flags


def test_commit_pin_belongs_to_the_pinned_and_installed_version():
    assert lc.LLAMA_CPP_COMMIT[0] == lc.LLAMA_CPP_PYTHON
    assert len(lc.LLAMA_CPP_COMMIT[1]) == 40 and int(lc.LLAMA_CPP_COMMIT[1], 16) >= 0
    assert f'"llama-cpp-python=={lc.LLAMA_CPP_PYTHON}"' in (REPO / "pyproject.toml").read_text()
    try:
        from importlib.metadata import version

        installed = version("llama-cpp-python")
    except Exception:  # the gguf extra not installed: the pin still has to agree with pyproject
        pytest.skip("llama-cpp-python is not installed (make install builds it)")
    assert installed == lc.LLAMA_CPP_COMMIT[0], "a new llama-cpp-python vendors another llama.cpp: re-pin the commit"


def test_sdist_commit_is_read_from_the_submodule_head(tmp_path):
    assert lc.sdist_commit(_fake_sdist(tmp_path / "s.tar.gz", "ab" * 20)) == "ab" * 20
    real = Path(os.environ.get("QBENCH_CACHE") or weights.default_dest().parent) / "downloads" / f"{SDIST_ROOT}.tar.gz"
    if real.is_file():  # the sdist pip downloaded for the converter: the pin is what it carries
        assert lc.sdist_commit(real) == lc.LLAMA_CPP_COMMIT[1]


def test_system_info_parses_into_flags_per_backend():
    text = "CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 | REPACK = 1 | CUDA : ARCHS = 900 | USE_GRAPHS = 1 |"
    assert lc.parse_system_info(text) == {"CPU": {"SSE3": "1", "AVX2": "1", "OPENMP": "1", "REPACK": "1"},
                                          "CUDA": {"ARCHS": "900", "USE_GRAPHS": "1"}}


def test_build_info_records_the_commit_and_the_features():
    pytest.importorskip("llama_cpp", reason="the gguf extra (make install builds it)")
    info = lc.build_info()
    assert info["llama_cpp_commit"] == lc.LLAMA_CPP_COMMIT[1]
    assert info["llama_cpp_features"]["CPU"], info["llama_cpp_system_info"]


# ---------------------------------------------------------------------------------------------------------
# 2. the tools, built once


def _fake_cmake(calls):
    def build(sdist, work, jobs):
        calls.append(jobs)
        (work / "bin").mkdir()
        for tool in lc.TOOLS:
            (work / "bin" / tool).write_text("#!/bin/sh\n")
        return {"cmake_args": list(lc.TOOLS_CMAKE_ARGS), "build_s": 1.0, "jobs": jobs}
    return build


def test_build_tools_builds_once_into_the_sources_bin(cache, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(lc, "_cmake_tools", _fake_cmake(calls))
    sdist = _fake_sdist(tmp_path / "s.tar.gz")
    bin_dir = lc.build_tools(cache, sdist, jobs=2)
    assert bin_dir == cache / f"llama.cpp-{lc.LLAMA_CPP_PYTHON}" / "bin"
    assert lc.build_tools(cache, sdist) == bin_dir and calls == [2], "a second call is a no-op"
    info = lc.tools_info(cache)
    assert info["llama_cpp_commit"] == lc.LLAMA_CPP_COMMIT[1] and "-DGGML_CUDA=OFF" in info["cmake_args"]
    assert not [p for p in bin_dir.parent.parent.iterdir() if "-tools-" in p.name], "the temp build dir is gone"


def test_build_tools_refuses_an_sdist_of_another_commit(cache, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(lc, "_cmake_tools", _fake_cmake(calls))
    with pytest.raises(RuntimeError, match="LLAMA_CPP_COMMIT"):
        lc.build_tools(cache, _fake_sdist(tmp_path / "s.tar.gz", "cd" * 20))
    assert calls == [] and lc.tools_info(cache) is None


def test_build_tools_command_line(cache, tmp_path):
    env = {**os.environ, "QBENCH_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "qbench.methods._llamacpp", "nothing"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "build-tools" in proc.stderr
    assert "llama-tools:" in (REPO / "Makefile").read_text()


# ---------------------------------------------------------------------------------------------------------
# 4. method.imatrix: keys and preflight


def _cfg(**over):
    from qbench import methods
    from qbench.config import yaml_defaults

    methods.register_schemas()  # yaml_defaults finds the method's schema in Hydra's ConfigStore
    cfg = yaml_defaults("method", "gguf_q4_k_m")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def test_imatrix_is_off_in_every_yaml_and_off_adds_nothing_to_the_cache_key():
    from qbench.methods import gguf

    for y in sorted((REPO / "conf" / "method").glob("gguf_*.yaml")):
        assert OmegaConf.load(y).imatrix.enabled is False, y
    assert gguf.imatrix(Path("/nowhere"), _cfg(), Path("/nowhere/f32.gguf"), "k", 1) is None
    assert gguf.imatrix_key(None) == {}


@pytest.mark.parametrize("over,message", [
    ({"imatrix.chunks": 0}, "method.imatrix.chunks: 0"),
    ({"imatrix.ctx_tokens": 4}, "method.imatrix.ctx_tokens: 4"),
    ({"imatrix.source": "/no/such.txt"}, "method.imatrix.source: '/no/such.txt'"),
    ({"imatrix.source": "builtin:nope"}, "method.imatrix.source: unknown builtin"),
    ({"imatrix.source": "allenai/c4"}, "method.imatrix.source: 'allenai/c4' is not a local file"),
])
def test_imatrix_bad_keys_are_one_line_naming_the_key(over, message):
    from qbench import methods

    with pytest.raises(ConfigError) as e:
        methods.get("gguf").validate(_cfg(**{"imatrix.enabled": True, **over}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_imatrix_without_the_tools_says_make_llama_tools(cache):
    from qbench import methods

    with pytest.raises(ConfigError) as e:
        methods.get("gguf").validate(_cfg(**{"imatrix.enabled": True}))
    assert str(e.value).startswith("method.imatrix.enabled:") and "run `make llama-tools`" in str(e.value)
    methods.get("gguf").validate(_cfg())  # off: nothing to build


# ---------------------------------------------------------------------------------------------------------
# slow: with the tools built (make llama-tools)

SOURCES = Path(os.environ.get(lc.SOURCES_ENV) or weights.default_dest().parent / f"llama.cpp-{lc.LLAMA_CPP_PYTHON}")


@pytest.fixture(scope="module")
def tools():
    pytest.importorskip("llama_cpp", reason="the gguf extra (make install builds it)")
    if not all((SOURCES / "bin" / t).is_file() for t in lc.TOOLS):
        pytest.skip(f"llama.cpp's tools are not built in {SOURCES / 'bin'}: `make llama-tools` builds them")
    return SOURCES


def _sweep(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QBENCH_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO), lc.SOURCES_ENV: str(SOURCES)}
    proc = subprocess.run([sys.executable, "-m", "qbench", "-m", *args, f"run.runs_dir={tmp_path / 'runs'}",
                           "run.sweep=g", f"run.cache_dir={tmp_path / 'cache'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs" / "g").glob("*/result.json")}


TINY = ["model=tiny", "bench=quick", "bench.device=cpu", "bench.batch_sizes=[1]", "bench.new_tokens=2",
        "bench.min_repeats=1", "bench.max_repeats=1", "bench.warmup_runs=0", "bench.prompt_tokens=[8]",
        "bench.decode_prompt_tokens=4", "eval=none", "method.n_threads=1"]


@pytest.mark.slow
def test_tiny_imatrix_gives_another_file_and_records_its_calibration(tools, tmp_path):
    plain = _sweep([*TINY, "method=gguf_q4_k_m"], tmp_path / "a")["tiny__gguf_q4_k_m"]
    imx = _sweep([*TINY, "method=gguf_q4_k_m", "method.imatrix.enabled=true", "method.imatrix.ctx_tokens=128",
                  "method.imatrix.chunks=4"], tmp_path / "b")["tiny__gguf_q4_k_m"]
    assert plain["status"] == imx["status"] == "ok", imx.get("error")
    assert plain["method_info"]["imatrix"] is None
    rec = imx["method_info"]["imatrix"]
    assert rec["source"] == "builtin:tiny_text" and len(rec["text_sha256"]) == 64 and len(rec["imatrix_sha256"]) == 64
    assert rec["tokens"] == 4 * 128 and rec["tools_commit"] == lc.LLAMA_CPP_COMMIT[1]
    assert imx["method_info"]["quantizer"] == "llama-quantize"
    assert imx["method_info"]["cache_key"] != plain["method_info"]["cache_key"]
    files = [Path(r["method_info"]["gguf_file"]).read_bytes() for r in (plain, imx)]
    assert files[0] != files[1], "the importance matrix changed how the weights were rounded"


def _kld_script():
    spec = importlib.util.spec_from_file_location("gguf_kld_check", REPO / "scripts" / "gguf_kld_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# qbench keeps the base's tokens to 99.9 % of the probability exactly; llama.cpp rounds base log-probs to 16 bits
# over the top 16 nats and drops the rest. Measured on SmolLM2-135M and the tiny model: within 1 % (docs/gguf.md).
KLD_REL_TOLERANCE = 0.03


@pytest.mark.slow
def test_qbench_kld_agrees_with_llama_perplexity_on_the_same_tokens(tools, tmp_path):
    res = _sweep([*TINY, "method=gguf_q4_k_m"], tmp_path)["tiny__gguf_q4_k_m"]
    quant = Path(res["method_info"]["gguf_file"])
    base = next((tmp_path / "cache" / "quantized").glob("*/model-f32.gguf"))
    r = _kld_script().compare(base, quant, ctx=128, chunks=4, threads=1, work=tmp_path / "kld")
    lp, qb = r["llama_perplexity"], r["qbench"]
    assert qb["n_tokens"] == 4 * 63 and lp["kl_mean"] > 0
    assert abs(r["kl_diff_rel"]) < KLD_REL_TOLERANCE, r
    assert abs(qb["kl_exact_mean"] - lp["kl_mean"]) / lp["kl_mean"] < KLD_REL_TOLERANCE, r
    # SmolLM2, 1,016 tokens: 0.9 points apart (docs/gguf.md; the cause is not pinned down yet)
    assert abs(r["top1_diff_pct"]) < 2.0, r
    assert abs(qb["ppl_base"] - lp["ppl_base"]) / lp["ppl_base"] < 0.02
