"""One source of truth for config: a key's default lives in the YAML under conf/, not again in its schema.

A schema (qbench/config.py, and each method's ``Config`` in qbench/methods/<kind>.py) types a key; a key every
option of its group sets is MISSING there, so a schema default can never disagree with the YAML (it did:
BenchConfig said new_tokens=128, conf/bench/default.yaml 32). Nested blocks (eval.perplexity, eval.quality,
method.calibration, method.imatrix) are checked key by key. Only deliberately optional keys keep a schema default
(docs/config.md says which and why).
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from qbench import config, methods
from qbench.errors import ConfigError
from qbench.run.preflight import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()  # the method schemas, which yaml_defaults("method", ...) looks up in Hydra's ConfigStore
# Keys an option may leave out: their absence means something (null revision: the Hub's main; no bundled
# architecture; no config.json overrides; the model's own tokenizer; no remote code; no Hub dataset subset,
# split or data file beyond a calibration source's own) or qbench sets them itself.
OPTIONAL = {"model": {"revision", "architecture", "config_overrides", "tokenizer", "trust_remote_code"},
            "method": {"calibration.subset", "calibration.split", "calibration.data_files"},
            "run": {"round"}}
GROUPS = {"model": config.ModelConfig, "bench": config.BenchConfig, "eval": config.EvalConfig}


def schema_defaults(schema: type, prefix: str = "") -> typing.Dict[str, typing.Any]:
    """{dotted key: its default, or MISSING} of a schema; a field typed by a dataclass is walked key by key."""
    out: typing.Dict[str, typing.Any] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(schema_defaults(hints[f.name], f"{key}."))
        elif f.default is not dataclasses.MISSING:
            out[key] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[key] = f.default_factory()
        else:
            out[key] = MISSING
    return out


def yaml_values(path: Path, block: typing.Optional[str] = None) -> typing.Dict[str, typing.Any]:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw = raw[block] if block else raw
    raw.pop("defaults", None)
    return raw


def lookup(values: typing.Dict[str, typing.Any], key: str) -> typing.Any:
    """The YAML's value of a dotted key, or a marker when the YAML does not set it."""
    node: typing.Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return NOT_SET
        node = node[part]
    return node


NOT_SET = "(not set)"


def competing(schema: type, values: typing.Dict[str, typing.Any], optional: set, where: str) -> typing.List[str]:
    """Each key whose default is declared twice (schema and YAML), or that the YAML leaves to no one."""
    problems = []
    for key, default in schema_defaults(schema).items():
        if key in optional:
            continue
        if default is not MISSING:
            problems.append(f"{where}: {key}: the schema's default {default!r} competes with the YAML's "
                            f"{lookup(values, key)!r}")
        elif lookup(values, key) is NOT_SET:
            problems.append(f"{where}: {key}: no value (the schema has none; the YAML must set it)")
    return problems


def method_schema(path: Path) -> type:
    return methods.get(yaml_values(path)["kind"]).Config


CASES = [(g, p) for g in (*GROUPS, "method") for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,path", CASES, ids=[f"{g}/{p.stem}" for g, p in CASES])
def test_no_schema_default_competes_with_the_yaml(group, path):
    schema = method_schema(path) if group == "method" else GROUPS[group]
    problems = competing(schema, yaml_values(path), OPTIONAL.get(group, set()), str(path.relative_to(CONF)))
    assert not problems, "\n".join(problems)


def test_every_method_schema_is_checked_against_a_yaml():
    checked = {method_schema(p) for p in (CONF / "method").glob("*.yaml")}
    assert {methods.get(k).Config for k in methods.kinds()} <= checked


def test_run_defaults_live_in_config_yaml():
    values = yaml_values(CONF / "config.yaml", "run")
    problems = competing(config.RunConfig, values, OPTIONAL["run"], "config.yaml run")
    assert not problems, "\n".join(problems)


def test_optional_keys_are_schema_keys():
    schemas = {"run": [config.RunConfig], "method": [methods.get(k).Config for k in ("gptq", "awq")], **{
        g: [s] for g, s in GROUPS.items()}}
    for group, keys in OPTIONAL.items():
        for schema in schemas[group]:
            assert keys <= set(schema_defaults(schema)), (group, schema)


@dataclasses.dataclass
class _Block:  # at module level: typing.get_type_hints resolves the annotation "_Block" here
    window: int = 512
    cap: typing.Optional[int] = MISSING


@dataclasses.dataclass
class _Schema:
    new_tokens: int = 128
    seed: int = MISSING
    block: _Block = dataclasses.field(default_factory=_Block)


def test_the_check_sees_a_competing_default():
    assert competing(_Schema, {"new_tokens": 32, "block": {"window": 256}}, set(), "x.yaml") == [
        "x.yaml: new_tokens: the schema's default 128 competes with the YAML's 32",
        "x.yaml: seed: no value (the schema has none; the YAML must set it)",
        "x.yaml: block.window: the schema's default 512 competes with the YAML's 256",
        "x.yaml: block.cap: no value (the schema has none; the YAML must set it)"]


def test_yaml_defaults_composes_the_yaml_without_hydra():
    bench = config.yaml_defaults("bench", "default", new_tokens=7)
    assert bench.new_tokens == 7 and list(bench.decode_paths) == ["eager", "static", "graph"]
    assert OmegaConf.get_type(bench) is config.BenchConfig
    assert config.yaml_defaults("bench", "quick").new_tokens == 16
    assert config.yaml_defaults("model", "tiny").source == "builtin:tiny"
    assert config.yaml_defaults("run").baseline_method == "bf16"
    with pytest.raises(ConfigError, match="bench: no option 'nope'"):
        config.yaml_defaults("bench", "nope")


def test_a_key_no_yaml_sets_is_one_line_naming_it_and_its_file():
    cfg = OmegaConf.create({"bench": config.yaml_defaults("bench", "quick"),
                            "hydra": {"runtime": {"choices": {"bench": "quick"}}}})
    config.check_no_missing(cfg)
    cfg.bench.seed = MISSING
    with pytest.raises(ConfigError, match=r"^bench.seed: no value; conf/bench/quick.yaml must set it"):
        config.check_no_missing(cfg)


def test_yaml_defaults_types_eval_and_its_nested_blocks():
    ev = config.yaml_defaults("eval", "none", enabled=True, tasks=["mmlu"])
    assert OmegaConf.get_type(ev) is config.EvalConfig and OmegaConf.get_type(ev.quality) is config.QualityConfig
    assert ev.enabled and list(ev.tasks) == ["mmlu"] and ev.batch_size == 8 and ev.quality.ctx_tokens == 512
    assert config.yaml_defaults("eval", "demo").quality.max_windows == 4
    assert not OmegaConf.missing_keys(ev)
    # the schema alone holds no value: all of them above came from the YAML
    assert {"tasks", "quality.ctx_tokens"} <= OmegaConf.missing_keys(OmegaConf.structured(config.EvalConfig))


def test_yaml_defaults_types_a_method_by_the_schema_its_yaml_names():
    gptq = config.yaml_defaults("method", "gptq_int8", bits=4)
    assert OmegaConf.get_type(gptq) is methods.get("gptq").Config
    assert gptq.bits == 4 and gptq.calibration.seq_len_tokens == 2048 and gptq.calibration.subset is None
    assert config.yaml_defaults("method", "gguf_q8_0").imatrix.ctx_tokens == 512
    assert not OmegaConf.missing_keys(gptq)
    with pytest.raises(Exception, match="bits_per_weight"):  # typed: a misspelt key fails
        config.yaml_defaults("method", "bf16", bits_per_weight=16)


def test_yaml_defaults_names_an_unregistered_method_schema(tmp_path, monkeypatch):
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "mine.yaml").write_text("defaults:\n  - schema/nope@_here_\n  - _self_\nname: mine\n")
    (tmp_path / "method" / "bare.yaml").write_text("name: bare\n")
    monkeypatch.setattr(config, "CONF_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"^defaults: schema/nope \(named by .*mine.yaml\) is not registered"):
        config.yaml_defaults("method", "mine")
    with pytest.raises(ConfigError, match=r"^defaults: .*bare.yaml names no method schema"):
        config.yaml_defaults("method", "bare")


@pytest.mark.parametrize("group,option,key", [("eval", "quality", "quality.ctx_tokens"),
                                              ("method", "gptq", "calibration.seed")])
def test_a_nested_key_an_option_leaves_out_is_named_with_its_file(tmp_path, monkeypatch, group, option, key):
    """An option of one's own that omits a nested key gets no hidden schema value: one line names key and file."""
    leaf = key.rsplit(".", 1)[1]
    text = (CONF / group / f"{option}.yaml").read_text()
    (tmp_path / group).mkdir()
    (tmp_path / group / "mine.yaml").write_text(
        "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith(f"{leaf}:")))
    monkeypatch.setattr(config, "CONF_DIR", tmp_path)
    cfg = OmegaConf.create({group: config.yaml_defaults(group, "mine"),
                            "hydra": {"runtime": {"choices": {group: "mine"}}}})
    with pytest.raises(ConfigError, match=rf"^{group}.{key}: no value; conf/{group}/mine.yaml must set it"):
        config.check_no_missing(cfg)
