"""lm-eval's built requests kept between cells (qbench/evaluate/request_cache.py): same figures, fewer seconds."""
from __future__ import annotations

import shutil
import time
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
    assert plain["time_budget"]["request_cache"] == {"dir": None, "hits": 0, "misses": 0, "encoding_hits": 0,
                                                     "encoding_misses": 0, "encoding_s": None}
    # MMLU's one log-likelihood call: tokenized and kept by the first cell, read back by the second
    assert [first["time_budget"]["request_cache"][k] for k in ("encoding_hits", "encoding_misses")] == [0, 1]
    assert [second["time_budget"]["request_cache"][k] for k in ("encoding_hits", "encoding_misses")] == [1, 0]
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


def test_cached_requests_reach_the_model_as_the_same_texts_in_the_same_order(tiny_model, tmp_path, monkeypatch):
    """What the model is asked, not only its answers: a tiny model's few answers could agree by chance. Two runs of
    one cell on a GPU gave different GSM8K generations (docs/time_budget.md); this pins that the requests are not
    why: every request's document, context and generation settings, in lm-eval's order, built or read back."""
    from lm_eval.models.huggingface import HFLM

    asked = []

    def record(kind, answer):
        def call(self, requests, disable_tqdm=False):
            asked[-1].extend((kind, r.doc_id, repr(r.args)) for r in requests)
            return [answer(r) for r in requests]
        return call

    monkeypatch.setattr(HFLM, "generate_until", record("generate_until", lambda r: ""))
    monkeypatch.setattr(HFLM, "loglikelihood", record("loglikelihood", lambda r: (-1.0, False)))
    model, tok = tiny_model
    cfg = eval_cfg(limit=None, task_limits={}, num_fewshot={"mmlu": 5, "gsm8k": 5}, max_gen_toks=256)
    runs = {}
    for run, cache in (("plain", None), ("first", tmp_path), ("second", tmp_path)):
        asked.append([])
        out = accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=cache and str(cache))
        runs[run] = asked[-1]
        if run == "second":
            assert out["time_budget"]["request_cache"]["hits"] == 3
    # every fixture item: 2 subjects' MMLU items x 4 choices, and GSM8K's 20 test problems
    kinds = [kind for kind, _, _ in runs["plain"]]
    assert kinds.count("generate_until") == 20 and kinds.count("loglikelihood") > 0
    assert runs["first"] == runs["plain"] and runs["second"] == runs["plain"]


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
                                                   "hits": 0, "misses": 1, "encoding_hits": 0, "encoding_misses": 0,
                                                   "encoding_s": 0.0}  # no log-likelihood call to tokenize


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


MMLU_ONLY = dict(tasks=["mmlu"], num_fewshot={"mmlu": 2}, task_limits={})


def _scored(lm, requests):
    return lm.loglikelihood(requests, disable_tqdm=True)


def test_kept_token_ids_are_the_ones_lm_eval_builds(tiny_model, tmp_path, monkeypatch):
    """keep_encodings: a second cell's lm-eval gets the very (context ids, continuation ids) lists lm-eval builds
    itself, for an empty context too, and the same scores."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_model
    contexts = ["Question: 2 + 2?\nAnswer:", "Question: 3 + 3? \nAnswer: ", ""]
    requests = [Instance("loglikelihood", {}, (c, f" {x}"), i) for i, (c, x) in
                enumerate((c, x) for c in contexts for x in ("4", "six", "Paris"))]
    built = []
    fresh = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    score = fresh._loglikelihood_tokens
    fresh._loglikelihood_tokens = lambda reqs, **k: built.append(reqs) or score(reqs, **k)
    want = _scored(fresh, requests)

    read = []
    original = request_cache._read_encodings
    monkeypatch.setattr(request_cache, "_read_encodings", lambda path, reqs: read.append(original(path, reqs)) or read[-1])
    for cell in ("first", "second"):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
        # tokenizing made slow (20 ms an encode) and scoring slower (1 s): encoding_s holds the first, not the second
        encode, own_score = lm.tok_encode, lm._loglikelihood_tokens
        lm.tok_encode = lambda *a, _f=encode, **k: time.sleep(0.02) or _f(*a, **k)
        lm._loglikelihood_tokens = lambda *a, _f=own_score, **k: time.sleep(1.0) or _f(*a, **k)
        clock = request_cache.EvalClock(tmp_path, None, None)
        request_cache.keep_encodings(lm, tmp_path / "encodings", clock)
        assert _scored(lm, requests) == want, cell
        assert (clock.encoding_hits, clock.encoding_misses) == ((0, 1) if cell == "first" else (1, 0))
        if cell == "first":  # 9 requests, at least one encode each
            assert 9 * 0.02 <= clock.encoding_s < 1.0, clock.encoding_s
        else:  # the ids read, nothing encoded
            assert 0 <= clock.encoding_s < 0.02, clock.encoding_s
    assert read[0] is None and read[1] == built[0]  # the second cell's lists, texts and ids: lm-eval's own
    assert len(list((tmp_path / "encodings").glob("*.pkl"))) == 1


def test_another_tokenizer_or_other_requests_tokenize_again(tiny_model, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_model
    cfg = eval_cfg(**MMLU_ONLY)
    accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=str(tmp_path))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    key = request_cache.tokenizer_key(lm)
    lm.add_bos_token = not lm.add_bos_token  # lm-eval's tok_encode adds a BOS now: other ids
    assert request_cache.tokenizer_key(lm) != key
    out = accuracy.run(model, tok, eval_cfg(**{**MMLU_ONLY, "limit": 2}), "cpu", random_weights=True,
                       cache_dir=str(tmp_path))
    assert out["time_budget"]["request_cache"]["encoding_misses"] == 1  # fewer items: other requests, other key
    assert len(list((tmp_path / "lm_eval_requests" / "encodings").glob("*.pkl"))) == 2


def test_a_torn_encoding_file_is_tokenized_again_and_a_full_disk_only_warns(tiny_model, tmp_path, monkeypatch,
                                                                          caplog):
    model, tok = tiny_model
    cfg = eval_cfg(**MMLU_ONLY)
    want = accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=str(tmp_path))
    (kept,) = (tmp_path / "lm_eval_requests" / "encodings").glob("*.pkl")
    kept.write_bytes(b"torn")
    out = accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=str(tmp_path))
    assert out["time_budget"]["request_cache"]["encoding_misses"] == 1 and _figures(out) == _figures(want)
    assert kept.read_bytes() != b"torn" and "unreadable" in caplog.text
    kept.unlink()

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(request_cache, "_write_atomic", full)
    out = accuracy.run(model, tok, cfg, "cpu", random_weights=True, cache_dir=str(tmp_path / "other"))
    assert _figures(out) == _figures(want)  # neither the requests nor their token ids could be kept: a warning each
    assert "request cache" in caplog.text and "encoding cache" in caplog.text and "not written" in caplog.text
    assert out["time_budget"]["request_cache"]["misses"] == 2  # the two MMLU subjects' requests
    assert out["time_budget"]["request_cache"]["encoding_misses"] == 1  # MMLU's one log-likelihood call
