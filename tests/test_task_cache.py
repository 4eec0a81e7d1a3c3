"""lm-eval's built requests kept between cells (qbench/evaluate/request_cache.py): same figures, fewer seconds."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")


from qbench.config import validate_eval, yaml_defaults
from qbench.evaluate import accuracy, request_cache
from qbench.load import tiny

FIXTURES = Path(__file__).resolve().parents[1] / "qbench" / "data" / "fixtures"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.build(tmp_path_factory.mktemp("tiny") / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


GSM8K_ONLY = dict(tasks=["gsm8k"], num_fewshot={"gsm8k": 1}, mmlu_subjects=[])


def eval_cfg(**kw):
    base = dict(enabled=True, tasks=["mmlu", "gsm8k"], offline="true", data_dir="builtin:fixtures",
                mmlu_subjects=["college_mathematics", "philosophy"], limit=3, task_limits={"gsm8k": 2},
                num_fewshot={"mmlu": 2, "gsm8k": 1}, max_gen_toks=8, batch_size=4, seed=1234)
    base.update(kw)
    cfg = yaml_defaults("eval", "none", **base)
    validate_eval(cfg)
    return cfg


def _figures(out):
    """Everything a report reads from the accuracy section, less the seconds."""
    tasks = {name: {k: v for k, v in entry.items() if k not in ("eval_time_s", "items_per_s")}
             for name, entry in out["tasks"].items()}
    return tasks, out["items"]


def test_cached_requests_give_the_same_figures(tiny_model, tmp_path):
    model, tok = tiny_model
    plain = accuracy.run(model, tok, eval_cfg(), "cpu", random_weights=True)
    first = accuracy.run(model, tok, eval_cfg(), "cpu", random_weights=True, cache_dir=str(tmp_path))
    second = accuracy.run(model, tok, eval_cfg(), "cpu", random_weights=True, cache_dir=str(tmp_path))
    assert _figures(first) == _figures(plain) and _figures(second) == _figures(plain)
    # 2 MMLU subjects + GSM8K: three tasks built once, then read back
    assert plain["time_budget"]["request_cache"] == {"dir": None, "hits": 0, "misses": 0}
    assert first["time_budget"]["request_cache"]["misses"] == 3 and first["time_budget"]["request_cache"]["hits"] == 0
    assert second["time_budget"]["request_cache"]["hits"] == 3 and second["time_budget"]["request_cache"]["misses"] == 0
    assert len(list((tmp_path / "lm_eval_requests").glob("*.pkl"))) == 3
    budget = second["time_budget"]
    assert budget["model_calls_s"] > 0 and budget["tasks_s"] > 0 and budget["requests_s"] >= 0
    assert budget["model_calls_s"] + budget["tasks_s"] + budget["requests_s"] <= sum(
        e["eval_time_s"] for e in second["tasks"].values()) + 0.05
    # the model calls by request type: 2 subjects x 3 items x 4 choices scored, 2 GSM8K problems generated
    calls = budget["model_calls"]
    assert calls["loglikelihood"]["requests"] == 24 and calls["generate_until"]["requests"] == 2
    assert set(calls) == {"loglikelihood", "generate_until"}
    assert sum(c["s"] for c in calls.values()) == pytest.approx(budget["model_calls_s"])
    assert all(c["s"] > 0 for c in calls.values())


@pytest.mark.parametrize("change, rebuilt", [
    (dict(seed=7), 3),  # every task's few-shot draw
    (dict(limit=2), 2),  # the two MMLU subjects; GSM8K keeps its own limit (task_limits)
    (dict(num_fewshot={"mmlu": 1, "gsm8k": 1}), 2),
    (dict(max_gen_toks=4), 1),  # GSM8K's generation settings travel in its requests
])
def test_what_changes_the_prompts_changes_the_key(tiny_model, tmp_path, change, rebuilt):
    """Another seed, limit, few-shot count or generation setting: those tasks' requests are built anew, never a
    stale file read; the tasks it does not touch are still read back."""
    model, tok = tiny_model
    accuracy.run(model, tok, eval_cfg(), "cpu", random_weights=True, cache_dir=str(tmp_path))
    out = accuracy.run(model, tok, eval_cfg(**change), "cpu", random_weights=True, cache_dir=str(tmp_path))
    assert out["time_budget"]["request_cache"]["misses"] == rebuilt
    assert out["time_budget"]["request_cache"]["hits"] == 3 - rebuilt


def test_changed_data_changes_the_key(tiny_model, tmp_path):
    model, tok = tiny_model
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    cfg = eval_cfg(data_dir=str(data), **GSM8K_ONLY)
    accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=str(tmp_path / "cache"))
    test = data / "gsm8k" / "test.jsonl"
    lines = test.read_text().splitlines()
    test.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same items, another order
    request_cache.folder_digest.cache_clear()  # a new process would hash the folder afresh
    out = accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=str(tmp_path / "cache"))
    assert out["time_budget"]["request_cache"] == {"dir": str(tmp_path / "cache" / "lm_eval_requests"),
                                                   "hits": 0, "misses": 1}


def test_unreadable_cache_file_is_rebuilt(tiny_model, tmp_path):
    model, tok = tiny_model
    cfg = eval_cfg(**GSM8K_ONLY)
    want = accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=str(tmp_path))
    (pkl,) = (tmp_path / "lm_eval_requests").glob("*.pkl")
    pkl.write_bytes(b"torn")
    out = accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=str(tmp_path))
    assert out["time_budget"]["request_cache"]["misses"] == 1 and _figures(out) == _figures(want)
    assert pkl.read_bytes() != b"torn"


def test_off_switch_and_online_build_every_time(tiny_model, tmp_path):
    assert accuracy._request_cache_dir(str(tmp_path), eval_cfg(cache_requests=False), True, "/d") is None
    assert accuracy._request_cache_dir(str(tmp_path), eval_cfg(), False, None) is None  # online: Hub data may change
    assert accuracy._request_cache_dir(str(tmp_path), eval_cfg(), True, "/d") == tmp_path / "lm_eval_requests"
