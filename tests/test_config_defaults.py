"""One source of truth for config: a key's default lives in the YAML under conf/, not again in its schema.

A schema (qbench/config.py) types a key; a key every option of its group sets is MISSING there, so a schema
default can never disagree with the YAML (it did: BenchConfig said new_tokens=128, conf/bench/default.yaml 32).
Only deliberately optional keys keep a schema default (docs/config.md says which and why).
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from qbench import config
from qbench.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
# Keys an option may leave out: their absence means something (null revision: the Hub's main; no bundled
# architecture; no config.json overrides; the model's own tokenizer; no remote code) or qbench sets them itself.
OPTIONAL = {"model": {"revision", "architecture", "config_overrides", "tokenizer", "trust_remote_code"},
            "run": {"round"}}
# Groups whose schema carries no competing default (item 1 of issue 31 for these; see docs/config.md for eval/method).
GROUPS = {"model": config.ModelConfig, "bench": config.BenchConfig}


def schema_defaults(schema: type) -> typing.Dict[str, typing.Any]:
    """{field: its default, or MISSING} of a flat schema."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = MISSING
    return out


def yaml_values(path: Path, block: typing.Optional[str] = None) -> typing.Dict[str, typing.Any]:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw = raw[block] if block else raw
    raw.pop("defaults", None)
    return raw


def competing(schema: type, values: typing.Dict[str, typing.Any], optional: set, where: str) -> typing.List[str]:
    """Each key whose default is declared twice (schema and YAML), or that the YAML leaves to no one."""
    problems = []
    for key, default in schema_defaults(schema).items():
        if key in optional:
            continue
        if default is not MISSING:
            said = values.get(key, "(not set)")
            problems.append(f"{where}: {key}: the schema's default {default!r} competes with the YAML's {said!r}")
        elif key not in values:
            problems.append(f"{where}: {key}: no value (the schema has none; the YAML must set it)")
    return problems


CASES = [(g, p) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,path", CASES, ids=[f"{g}/{p.stem}" for g, p in CASES])
def test_no_schema_default_competes_with_the_yaml(group, path):
    problems = competing(GROUPS[group], yaml_values(path), OPTIONAL.get(group, set()), str(path.relative_to(CONF)))
    assert not problems, "\n".join(problems)


def test_run_defaults_live_in_config_yaml():
    values = yaml_values(CONF / "config.yaml", "run")
    problems = competing(config.RunConfig, values, OPTIONAL["run"], "config.yaml run")
    assert not problems, "\n".join(problems)


def test_optional_keys_are_schema_keys():
    for group, keys in OPTIONAL.items():
        schema = config.RunConfig if group == "run" else GROUPS[group]
        assert keys <= set(schema_defaults(schema)), group


def test_the_check_sees_a_competing_default():
    @dataclasses.dataclass
    class Schema:
        new_tokens: int = 128
        seed: int = MISSING

    assert competing(Schema, {"new_tokens": 32}, set(), "x.yaml") == [
        "x.yaml: new_tokens: the schema's default 128 competes with the YAML's 32",
        "x.yaml: seed: no value (the schema has none; the YAML must set it)"]


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
