"""result.json's typed sections round-trip every stored example exactly: the schema before and after (issue 31)."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from qbench.store.result import ABSENT, Latency, Metrics, Result

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "reports" / "examples" / "runs").glob("**/result.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_every_example_result_round_trips(path):
    data = json.loads(path.read_text())
    result = Result.from_dict(data)
    assert result.to_dict() == data
    if isinstance(data.get("metrics"), dict) and isinstance(data["metrics"].get("latency"), dict):
        assert isinstance(result.metrics.latency, Latency)
        assert result.metrics.latency.settings == data["metrics"]["latency"].get("settings", ABSENT)


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
