"""result.json's typed sections round-trip every stored example exactly: the schema before and after (issue 31)."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from qbench.store import result as R
from qbench.store.result import ABSENT, Latency, Metrics, Result, ResultTypeError, Section

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "reports" / "examples" / "runs").glob("**/result.json")) + sorted(
    (ROOT / "tests" / "fixtures" / "runs").glob("**/result.json"))  # older results too: the report reads those


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_every_example_result_round_trips(path):
    data = json.loads(path.read_text())
    result = Result.from_dict(data)
    assert result.to_dict() == data
    assert Result.from_dict(data, strict=True).to_dict() == data  # every declared field has its declared type
    assert not _undeclared(result), f"keys no typed section declares: {_undeclared(result)}"
    if isinstance(data.get("metrics"), dict) and isinstance(data["metrics"].get("latency"), dict):
        assert isinstance(result.metrics.latency, Latency)
        if "settings" in data["metrics"]["latency"]:
            assert result.metrics.latency.settings.to_dict() == data["metrics"]["latency"]["settings"]


def test_examples_exist():
    assert len(EXAMPLES) >= 10


def test_unknown_keys_survive_and_absent_stays_absent():
    data = {"status": "ok", "an_older_field": 1, "metrics": {"latency": {"decode": {}, "a_method_block": [1]}}}
    result = Result.from_dict(data)
    assert result.extra == {"an_older_field": 1} and result.metrics.latency.extra == {"a_method_block": [1]}
    assert result.error is ABSENT and "error" not in result.to_dict()
    assert result.to_dict() == data


def test_docs_name_every_typed_field():
    doc = (ROOT / "docs" / "results.md").read_text()
    named = set(re.findall(r'["`](\w+)["`]', doc))  # "key" in the JSON sketch or `key` in a table
    for cls in (Result, Metrics, Latency):
        missing = [f.name for f in dataclasses.fields(cls) if f.name != "extra" and f.name not in named]
        assert not missing, f"docs/results.md does not name {cls.__name__} fields {missing}"


def _undeclared(section, path="result"):
    """Every key in the ``extra`` of a section that is not open (docs/results.md, Field reference), by path."""
    found = []
    if isinstance(section, Section):
        if section.extra and not section.OPEN:
            found += [f"{path}.{k}" for k in section.extra]
        for f in dataclasses.fields(section):
            found += _undeclared(getattr(section, f.name), f"{path}.{f.name}")
    elif isinstance(section, (list, dict)):
        for key, value in (section.items() if isinstance(section, dict) else enumerate(section)):
            found += _undeclared(value, f"{path}.{key}")
    return found


def test_every_section_is_typed():
    """memory, latency (settings, prefill, decode, timed figures), accuracy, quality, error and timings are
    dataclasses, so that readers use attributes, not dict chains."""
    data = json.loads(EXAMPLES[0].read_text())
    result = Result.from_dict({**data, "error": {"class": "oom", "type": "OutOfMemoryError", "message": "m",
                                                 "traceback": "", "phase": "latency"}})
    m = result.metrics
    assert isinstance(m.memory, R.Memory) and isinstance(m.latency.settings, R.LatencySettings)
    assert isinstance(m.latency.decode[0], R.DecodeFigure) and isinstance(m.latency.decode[0].tokens_per_s, R.Dist)
    assert isinstance(result.timings, R.Timings)
    assert result.error.klass == "oom" and result.to_dict()["error"]["class"] == "oom"


@pytest.mark.parametrize("patch, key", [
    ({"metrics": {"latency": {"decode": [{"batch_size": "8"}]}}}, "metrics.latency.decode[0].batch_size"),
    ({"metrics": {"memory": []}}, "metrics.memory"),
    ({"error": {"class": 3}}, "error.class"),
    ({"timings": {"load_s": True}}, "timings.load_s"),
])
def test_strict_refuses_a_wrong_type_naming_its_key(patch, key):
    with pytest.raises(ResultTypeError) as info:
        Result.from_dict({"status": "ok", **patch}, strict=True)
    assert str(info.value).startswith(key + ":")
    assert "\n" not in str(info.value)


def test_docs_field_reference_is_the_generated_one():
    """docs/results.md documents every declared field, and nothing it documents there is undeclared: its field
    reference is generated from the dataclasses (python -m qbench.store.result docs/results.md)."""
    doc = (ROOT / "docs" / "results.md").read_text()
    assert R.BEGIN in doc and R.END in doc
    assert R.with_reference(doc) == doc, "docs/results.md: run python -m qbench.store.result docs/results.md"
    assert {cls.__name__ for cls in R.SECTIONS} == {
        c.__name__ for c in vars(R).values() if isinstance(c, type) and issubclass(c, Section) and c is not Section}


def test_write_result_refuses_a_malformed_section_before_it_reaches_disk(tmp_path):
    from qbench.store import jsonio

    good = json.loads(EXAMPLES[0].read_text())
    bad = {**good, "metrics": {**good["metrics"], "latency": {**good["metrics"]["latency"], "prefill": {"1": 2}}}}
    with pytest.raises(ResultTypeError, match=r"^metrics\.latency\.prefill: expected list\[PrefillFigure\] \| null"):
        jsonio.write_result(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []  # neither result.json nor a temp file
    jsonio.write_result(tmp_path, Result.from_dict(good))  # a typed Result is written as its dict
    assert json.loads((tmp_path / "result.json").read_text()) == good


def test_error_row_is_a_valid_typed_result():
    from qbench.store.rows import error_row

    cfg = {"run": {"sweep": "s", "round": None}, "model": {"name": "tiny"}, "method": {"name": "bf16", "kind": "dtype"}}
    row = error_row(cfg, "killed", "died of SIGKILL", "cell")
    result = Result.from_dict(row, strict=True)
    assert result.error.klass == "killed" and row["error"]["class"] == "killed" and row["metrics"] == {}
    assert set(row) == {"schema_version", "status", "sweep", "cell", "round", "model", "method", "method_kind",
                        "config", "identity", "finished_at", "scheduler", "metrics", "warnings", "error"}
