"""Every YAML under conf/ composes against its schema; bad input fails with one line naming the culprit."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qbench.config import validate
from qbench.errors import ConfigError
from qbench.run.cli import conf_dir, preflight, sweep_overrides
from qbench.run.preflight import check_method, register_configs

CONF = Path(conf_dir())
register_configs()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def hydra_ctx():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_every_yaml_starts_with_run_with():
    for path in CONF.rglob("*.yaml"):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        head = "\n".join(lines[:3])
        assert "run with:" in head, f"{path} does not open with a 'run with:' comment"
        # researchers edit these groups: no import paths in them (Hydra's own section may hold its callback)
        if path.parent.name in ("model", "method", "bench", "eval", "experiment"):
            assert "_target_" not in path.read_text(), path


@pytest.mark.parametrize("method", options("method"))
def test_every_method_composes_with_tiny(hydra_ctx, method, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(config_name="config", overrides=["model=tiny", f"method={method}"])
    assert cfg.method.name == method
    validate(cfg)
    check_method(cfg)


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes(hydra_ctx, model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(config_name="config", overrides=[f"model={model}", "model.random_init=true"])
    assert cfg.model.name == model
    validate(cfg)


@pytest.mark.parametrize("group", ["bench", "eval"])
def test_every_bench_and_eval_composes(hydra_ctx, group, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QBENCH_DATA", "builtin:fixtures")  # offline evaluation needs a data folder
    for option in options(group):
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
        validate(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_expands_and_validates(experiment, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the full sweeps name Hub models and Hub data
        monkeypatch.delenv(var, raising=False)
    # a GPU experiment is checked as on the card it was written for (an H100/H200: fp8 needs >= 8.9), not on
    # this CPU host, where a cuda cell's device checks would all say "this cell runs on a CPU"
    from qbench.run import preflight as pf

    host = pf.cell_device
    monkeypatch.setattr(pf, "cell_device", lambda cfg: ("cuda", (9, 0)) if cfg.bench.device == "cuda" else host(cfg))
    n = len(preflight(["-m", f"experiment={experiment}"]))
    assert n >= 2, f"experiment {experiment} sweeps {n} cell(s)"


def test_sweep_expansion_is_the_cartesian_product(hydra_ctx):
    cells = sweep_overrides(["model=tiny", "method=fp32,bf16", "bench.new_tokens=4,8"], multirun=True)
    assert len(cells) == 4
    assert ["model=tiny", "method=fp32", "bench.new_tokens=4"] in cells


def test_command_line_overrides_the_experiments_sweep(hydra_ctx):
    cells = sweep_overrides(["experiment=demo", "method=fp32,bf16"], multirun=True)
    methods = sorted(c for cell in cells for c in cell if c.startswith("method="))
    assert methods == ["method=bf16", "method=fp32"]


def test_demo_sweeps_six_methods(hydra_ctx):
    cells = sweep_overrides(["experiment=demo"], multirun=True)
    assert sorted(c for cell in cells for c in cell if c.startswith("method=")) == [
        "method=bf16", "method=bnb_int8", "method=bnb_nf4", "method=fp32", "method=gguf_q4_k_m", "method=gguf_q8_0"
    ]


def test_nf4_defaults_are_explicit(hydra_ctx):
    cfg = compose(config_name="config", overrides=["method=bnb_nf4"])
    assert cfg.method.bnb_4bit_quant_type == "nf4"
    assert cfg.method.bnb_4bit_use_double_quant is True
    assert cfg.method.bnb_4bit_compute_dtype == "bfloat16"


BAD_INPUTS = [
    (["method=nope"], "method/nope"),
    (["-m", "experiment=demo", "method=bf16,nope"], "method/nope"),
    (["experiment=nope"], "experiment/nope"),
    (["bench.batchsizes=[1]"], "batchsizes"),
    (["bench.new_tokens=abc"], "new_tokens"),
    (["bench.batch_sizes=[]"], "bench.batch_sizes"),
    (["bench.batch_sizes=[1,-8]"], "bench.batch_sizes"),
    (["model.dtype=int3"], "model.dtype"),
    (["model.source=/no/such/model", "model.random_init=false"], "/no/such/model"),
    (["model=llama3_1_8b_instruct"], "HF_HUB_OFFLINE"),
    (["method.kind=nope"], "method.kind"),
    (["bench.decode_paths=[warp]"], "bench.decode_paths"),
    (["model.name=../../etc"], "model.name"),
    (["run.sweep=a/b"], "run.sweep"),
    (["bench.cpu_affinity=0-3x"], "bench.cpu_affinity: '0-3x'"),  # malformed cpulist
    (["bench.cpu_affinity=gpu_near"], "bench.cpu_affinity: 'gpu_near'"),  # neither null, gpu_local nor a cpulist
    (["bench.max_warmup_runs=-1"], "bench.max_warmup_runs: -1 is negative"),
    (["bench.max_compile_s=0"], "bench.max_compile_s: 0.0 is not positive (null: no limit)"),
]


@pytest.mark.parametrize("argv,culprit", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_names_the_culprit_in_one_line(argv, culprit, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError) as info:
        preflight(argv + [f"run.runs_dir={runs}"])
    message = str(info.value)
    assert culprit in message
    assert "\n" not in message
    assert not runs.exists()


def test_malformed_yaml_names_the_file(tmp_path, monkeypatch):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "method" / "broken.yaml").write_text("# run with: nothing\nname: broken\nkind: [dtype\n")
    monkeypatch.setattr("qbench.run.cli.conf_dir", lambda: str(conf))
    with pytest.raises(ConfigError) as info:
        preflight(["method=broken", f"run.runs_dir={tmp_path / 'runs'}"])
    assert "broken" in str(info.value)
    assert "\n" not in str(info.value)


def test_bits_a_method_cannot_take(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"method.bits: 5"):
        preflight(["method=bnb_nf4", "method.bits=5"])


def test_runs_dir_not_writable():
    # /proc takes no files, even from root (CI runs as root, so permission bits would prove nothing)
    with pytest.raises(ConfigError, match=r"run.runs_dir: '/proc/qbench-runs'"):
        preflight(["run.runs_dir=/proc/qbench-runs"])
