"""Every method under conf/method/ (the folder is the list): it composes against its own schema, records only its
own keys, and, where its backend runs on a CPU, loads the tiny model, runs a forward pass with finite logits,
and holds exactly the bytes its analytic model says (measured / analytic within 1 %). A method that cannot run
on a CPU is refused at preflight in one line."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from qbench import methods
from qbench.config import MethodBase
from qbench.errors import ConfigError
from qbench.load import models
from qbench.measure import memory
from qbench.run.cli import conf_dir
from qbench.run.preflight import check_method, register_configs

register_configs()

REPO = Path(__file__).resolve().parents[1]
METHOD_YAMLS = sorted((Path(conf_dir()) / "method").glob("*.yaml"))
NAMES = [p.stem for p in METHOD_YAMLS]


def method_cfg(name: str, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny", f"method={name}", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def _calibrates(name: str) -> bool:
    return "calibration" in OmegaConf.load(Path(conf_dir()) / "method" / f"{name}.yaml")


def _param(name: str):
    # methods that calibrate quantize for real here (8 windows of 64 tokens: about a minute each on 2 cores),
    # marked slow so that -m "not slow" skips them; tests/test_gptq_awq.py covers them end to end
    return pytest.param(name, marks=pytest.mark.slow) if _calibrates(name) else name


def _cpu_refusal(name: str):
    """The one-line ConfigError a method gives for a CPU (None: it runs there)."""
    cfg = method_cfg(name).method
    check = getattr(methods.get(cfg.kind), "check_device", None)
    try:
        check is None or check(cfg, "cpu", None)
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    src = models.resolve(method_cfg("fp32").model, cache)
    src.info["cache_dir"] = str(cache)
    return src


@pytest.fixture(scope="module")
def loaded(tiny_source):
    """One load per method, shared by the tests below."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = method_cfg(name, "method.calibration.num_samples=8", "method.calibration.seq_len_tokens=64") \
                if _calibrates(name) else method_cfg(name)
            module = methods.get(cfg.method.kind)
            model, info = module.load(tiny_source, cfg.method, {"": "cpu"})
            cache[name] = (cfg, module, model, info)
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------------------
# every YAML: composes, own schema, own keys only


@pytest.mark.parametrize("name", NAMES)
def test_method_yaml_composes_with_its_own_schema(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = method_cfg(name)
    module = methods.get(cfg.method.kind)
    assert OmegaConf.get_type(cfg.method) is module.Config and issubclass(module.Config, MethodBase)
    check_method(cfg)  # kind, schema and the method's own validate()
    # a result records this method's keys and no other's
    assert set(cfg.method.keys()) == {f.name for f in dataclasses.fields(module.Config)}
    text = (Path(conf_dir()) / "method" / f"{name}.yaml").read_text()
    assert text.lstrip().startswith("# run with:"), name
    for key in cfg.method:  # every key says what it is (unit / choices / default) in a comment
        assert re.search(rf"^(\s*){key}:.*#", text, re.M) or key in ("calibration", "description"), f"{name}: {key} undocumented"


@pytest.mark.parametrize("name", NAMES)
def test_misspelt_key_fails_at_compose(name):
    with pytest.raises(Exception, match="group_sise"):
        method_cfg(name, "method.group_sise=64")


def test_fp16_records_no_other_methods_keys():
    keys = set(method_cfg("fp16").method.keys())
    assert keys == {"name", "kind", "dtype", "description", "bits"}


def test_existing_overrides_still_work():
    cfg = method_cfg("gptq", "method.group_size=64", "method.calibration.source=builtin:tiny_text",
                     "method.calibration.num_samples=4")
    assert cfg.method.group_size == 64 and cfg.method.calibration.num_samples == 4
    assert method_cfg("bnb_nf4", "method.bnb_4bit_quant_type=fp4").method.bnb_4bit_quant_type == "fp4"


def test_kind_and_schema_must_agree():
    cfg = method_cfg("bf16", "method.kind=bnb_int8")
    with pytest.raises(ConfigError, match="method.kind: 'bnb_int8' does not match the schema"):
        check_method(cfg)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        methods.get("nope")
    assert str(e.value) == f"method.kind: unknown method 'nope'; known: {', '.join(methods.kinds())}"
    assert "\n" not in str(e.value)


def test_registry_is_the_folder():
    files = sorted(p.stem for p in (REPO / "qbench" / "methods").glob("*.py") if not p.stem.startswith("_"))
    assert methods.kinds() == files
    assert {"hqq", "torchao_int8wo", "torchao_int4wo", "fp8"} <= set(methods.kinds())


def test_method_modules_import_nothing_heavy():
    """Listing and validating methods must not pull in torch / transformers / a quantization library."""
    code = ("import sys; from qbench import methods\n"
            "for k in methods.kinds(): methods.get(k)\n"
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'gptqmodel', 'hqq', 'torchao') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_method_names_an_extra_in_pyproject():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    in_methods = set(re.findall(r"qbench\[([^\]]*)\]", extras["methods"][0])[0].split(","))
    for kind in methods.kinds():
        extra = methods.get(kind).EXTRA
        if extra is not None:
            assert extra in extras and extra in in_methods, f"{kind}: extra '{extra}'"


# ---------------------------------------------------------------------------------------------------------
# every YAML whose backend runs on a CPU: load, forward, bytes


@pytest.mark.parametrize("name", [_param(n) for n in NAMES])
def test_method_loads_and_measured_equals_analytic(loaded, tiny_source, name):
    refusal = _cpu_refusal(name)
    if refusal is not None:
        pytest.skip(f"refused on a CPU: {refusal}")
    if hasattr(methods.get(method_cfg(name).method.kind), "measure_memory"):
        pytest.skip("runs outside torch and measures itself (gguf: llama.cpp): tests/test_gguf.py")
    cfg, module, model, info = loaded(name)
    json.dumps(info)  # goes into result.json
    tok = models.load_tokenizer(tiny_source)
    ids = tok(["Natalia sold clips to 48 of her friends"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits.float()).all()

    measured = memory.weight_footprint(model, module)["weight_bytes_measured"]
    analytic = memory.analytic_weights(model.config, module, cfg.method)["weight_bytes_analytic"]
    assert measured / analytic == pytest.approx(1.0, abs=0.01), f"{name}: measured {measured} vs analytic {analytic}"
    fp32 = memory.analytic_weights(model.config, methods.get("dtype"), method_cfg("fp32").method)
    share = memory.quantized_share(model, module)
    if memory.method_quantizes(module, cfg.method):
        assert measured < 0.5 * fp32["weight_bytes_analytic"]
        assert share["decoder_unquantized_fraction"] == 0.0  # the method says which layers it quantized
    else:
        assert share["params_quantized_measured"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_cpu_refusal_is_one_line_naming_the_key(name):
    refusal = _cpu_refusal(name)
    if refusal is None:
        return
    assert refusal.startswith("method.") and "\n" not in refusal


def test_fp8_refused_on_cpu_at_preflight(tmp_path, monkeypatch):
    from qbench.run.cli import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        preflight(["model=tiny", "method=fp8", "bench.device=cpu", f"run.runs_dir={tmp_path / 'runs'}"])
    assert str(e.value).startswith("method.kind: fp8 needs FP8 tensor cores") and "a CPU" in str(e.value)
    assert not (tmp_path / "runs").exists()
    fp8 = methods.get("fp8")
    with pytest.raises(ConfigError, match="compute capability 8.0"):  # an A100: no FP8 tensor cores
        fp8.check_device(method_cfg("fp8").method, "cuda", (8, 0))
    fp8.check_device(method_cfg("fp8").method, "cuda", (9, 0))  # H100 / H200


def test_fp8_bytes_match_torchao_float8_tensor():
    """fp8's analytic bytes against the Float8Tensor torchao builds (built here on a CPU: only its matmul
    needs FP8 tensor cores)."""
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    fp8 = methods.get("fp8")
    for granularity in ("row", "tensor"):
        cfg = method_cfg("fp8", f"method.granularity={granularity}").method
        gran = fp8.quant_type(cfg).granularity[1]
        lin = torch.nn.Linear(128, 256, bias=False, dtype=torch.bfloat16)
        w = Float8Tensor.from_hp(lin.weight.detach(), granularity=gran)
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        measured = memory.weight_footprint(lin, fp8)["weight_bytes_measured"]
        assert measured == fp8.linear_weight_bytes(256, 128, cfg), granularity
        assert fp8.is_quantized_module(lin)


def test_int4wo_bits_per_weight():
    cfg = method_cfg("torchao_int4wo", "method.packing_format=opaque").method
    b = methods.get("torchao_int4wo").linear_weight_bytes(4096, 4096, cfg)
    assert b * 8 / 4096**2 == pytest.approx(4.25)
    tile = method_cfg("torchao_int4wo", "method.packing_format=tile_packed_to_4d").method
    assert methods.get("torchao_int4wo").linear_weight_bytes(4096, 4096, tile) == b  # no padding at 4096
    assert methods.get("torchao_int4wo").linear_weight_bytes(128, 576, tile) == 128 * 1024 // 2 + 8 * 128 * 4


def test_int4wo_auto_layout_follows_the_cells_device():
    """auto is decided by where the cell runs, not by this host: a cuda cell checked on a CPU host (preflight of
    a GPU experiment, a SLURM head node) gets the CUDA layout, a cpu cell on a GPU host the CPU one."""
    m = methods.get("torchao_int4wo")
    cfg = method_cfg("torchao_int4wo").method
    assert cfg.packing_format == "auto"
    assert m.packing_format(cfg, "cuda") == "tile_packed_to_4d" and m.packing_format(cfg, "cpu") == "opaque"
    m.check_device(cfg, "cuda", (9, 0))
    m.check_device(cfg, "cpu", None)
    with pytest.raises(ConfigError, match="packing_format"):
        m.check_device(method_cfg("torchao_int4wo", "method.packing_format=opaque").method, "cuda", (9, 0))


def test_hqq_bits_per_weight_is_4_5():
    cfg = method_cfg("hqq").method
    assert methods.get("hqq").linear_weight_bytes(4096, 4096, cfg) * 8 / 4096**2 == pytest.approx(4.5)


def test_quantized_linears_really_are_bitsandbytes(loaded, tiny_source):
    import bitsandbytes as bnb

    int8 = loaded("bnb_int8")[2]
    # A fresh load: on CPU, bitsandbytes 0.50 repacks a Linear4bit for its CPU kernel at the first forward pass
    # and turns the double-quantized absmax back into one bf16 scale per block (quant_state.nested becomes
    # False), so the shared fixture, which the forward-pass tests have run, no longer shows the stored format.
    cfg = method_cfg("bnb_nf4")
    nf4, _ = methods.get(cfg.method.kind).load(tiny_source, cfg.method, {"": "cpu"})
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in int8.modules())
    layers4 = [m for m in nf4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers4
    qs = layers4[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested, "NF4 with double quantization"
    assert layers4[0].compute_dtype == torch.bfloat16


def test_nf4_bits_per_weight_is_4_127():
    cfg = method_cfg("bnb_nf4").method
    bytes_ = methods.get("bnb_4bit").linear_weight_bytes(4096, 4096, cfg)
    assert bytes_ * 8 / (4096 * 4096) == pytest.approx(4.127, abs=0.001)


@pytest.mark.parametrize("kind, why", [
    ("awq", ", which AWQ requires; group sizes that fit every layer: -1, 16, 32, 64"),
    ("hqq", ", which hqq requires"),
    ("torchao_int4wo", " (torchao would leave it unquantized)"),
])
def test_group_size_must_divide_every_input_width(kind, why):
    """The methods whose groups run along the input dimension refuse, with one line, a group size that does not
    divide a layer's width (SmolLM2's 576 at 128), each saying why; one that divides all passes."""
    from types import SimpleNamespace

    from qbench import methods
    from qbench.errors import ConfigError

    widths = {576: ["model.layers.0.self_attn.q_proj"], 1536: ["model.layers.0.mlp.down_proj"]}
    check = methods.get(kind).check_widths
    with pytest.raises(ConfigError) as err:
        check(SimpleNamespace(group_size=128), widths, "smollm2_135m")
    assert str(err.value) == ("method.group_size: 128 does not divide the input width 576 of smollm2_135m's layer "
                              "model.layers.0.self_attn.q_proj" + why)
    check(SimpleNamespace(group_size=64), widths, "smollm2_135m")


@pytest.mark.parametrize("name", ["torchao_int8wo", "torchao_int4wo"])
def test_torchao_methods_leave_inductor_settings_alone(tiny_source, name):
    """torchao's configs switch on Inductor's coordinate-descent tuning for the whole process by default: the
    compiled paths of torchao cells would get tuning no other method gets (and compile for minutes). Loading
    a torchao method leaves Inductor's settings as they were, and the result records why."""
    import torch._inductor.config as inductor

    cfg = method_cfg(name).method
    with inductor.patch(coordinate_descent_tuning=False, force_fuse_int_mm_with_mul=False):
        _model, info = methods.get(cfg.kind).load(tiny_source, cfg, {"": "cpu"})
        assert inductor.coordinate_descent_tuning is False and inductor.force_fuse_int_mm_with_mul is False
    assert '"set_inductor_config": false' in json.dumps(info["quantization_config"])


def test_fp8_leaves_inductor_settings_alone():
    """fp8 loads on FP8 GPUs only; its torchao config is checked here instead."""
    pytest.importorskip("torchao")
    assert methods.get("fp8").quant_type(method_cfg("fp8").method).set_inductor_config is False
