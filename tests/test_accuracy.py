"""accuracy.run end to end on the tiny random model, offline, on the bundled fixtures (CPU, seconds)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from omegaconf import OmegaConf

from qbench.config import validate_eval, yaml_defaults
from qbench.errors import ConfigError
from qbench.evaluate import accuracy, perplexity, tasks
from qbench.evaluate.lm_eval_tasks import MMLU_SUBJECTS
from qbench.evaluate.paired import compare_items
from qbench.load import tiny

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SUBJECTS = ["college_mathematics", "philosophy"]  # stem, humanities


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


def ppl_cfg(**kw):
    """eval.perplexity as conf/eval/none.yaml sets it, with ``kw`` on top."""
    return OmegaConf.merge(yaml_defaults("eval", "none").perplexity, kw)


def eval_cfg(**kw):
    base = dict(enabled=True, tasks=["mmlu", "gsm8k"], offline="true", data_dir="builtin:fixtures",
                mmlu_subjects=SUBJECTS, limit=3, task_limits={"gsm8k": 2}, max_gen_toks=8, batch_size=4, seed=1234,
                perplexity=ppl_cfg(enabled=True, source="builtin:tiny_text", seq_len_tokens=64, max_windows=3))
    base.update(kw)
    cfg = yaml_defaults("eval", "none", **base)
    validate_eval(cfg)
    tasks.check(cfg)  # what preflight checks on top: tasks vs the task table and the data at hand
    return cfg


@pytest.fixture(scope="module")
def result(tiny_model):
    model, tok = tiny_model
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        return accuracy.run(model, tok, eval_cfg(), "cpu", random_weights=True)
    finally:
        mp.undo()


def test_mmlu_scores_counts_and_categories(result):
    m = result["tasks"]["mmlu"]
    assert m["metric"] == "acc" and 0.0 <= m["value"] <= 1.0
    assert m["stderr"] is not None and m["stderr"] >= 0
    assert m["n_items"] == 6 and m["n_items_available"] == 20 and m["n_subjects"] == 2
    assert m["num_fewshot"] == 5 and m["limit"] == 3
    assert set(m["categories"]) == {"stem", "humanities"}
    assert all(c["n_items"] == 3 for c in m["categories"].values())
    assert set(m["subjects"]) == set(SUBJECTS)
    assert m["eval_time_s"] > 0 and m["items_per_s"] == pytest.approx(6 / m["eval_time_s"])
    assert m["lm_eval_task"] == "qbench_mmlu_subset"
    assert m["chance_level"] == 0.25


def test_mmlu_items_are_paired_records(result):
    m, items = result["tasks"]["mmlu"], result["items"]["mmlu"]
    assert items["doc_ids"] == [f"{s}/{i}" for s in sorted(SUBJECTS) for i in range(3)]
    assert len(items["correct"]) == len(items["predictions"]) == len(items["targets"]) == 6
    assert set(items["correct"]) <= {"0", "1"}
    # correctness is exactly "the chosen letter is the target"
    assert items["correct"] == "".join("1" if p == t else "0" for p, t in zip(items["predictions"], items["targets"]))
    # lm-eval's size-weighted aggregate is the mean of the item records
    assert m["value"] == pytest.approx(items["correct"].count("1") / 6)
    for cat, subject in (("stem", "college_mathematics"), ("humanities", "philosophy")):
        c = items["correct"][sorted(SUBJECTS).index(subject) * 3:][:3]
        assert m["categories"][cat]["value"] == pytest.approx(c.count("1") / 3)
    # the fixture targets are the CSV answer letters
    assert items["targets"][:3] == "".join(str("ABCD".index(r.rstrip("\n")[-1])) for r in
                                           (Path(__file__).resolve().parents[1] / "qbench/data/fixtures/mmlu/test/"
                                            "college_mathematics_test.csv").read_text().splitlines()[:3])


def test_gsm8k_reports_both_extractions(result):
    g, items = result["tasks"]["gsm8k"], result["items"]["gsm8k"]
    assert g["metric"] == "exact_match,strict-match"
    assert set(g["metrics"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert g["value"] == g["metrics"]["exact_match,strict-match"]
    assert g["n_items"] == 2 and g["n_items_available"] == 20 and g["num_fewshot"] == 5
    assert g["generation_kwargs"]["max_gen_toks"] == 8
    assert g["chance_level"] == 0.0
    assert items["doc_ids"] == [0, 1]
    assert set(items["correct_by_metric"]) == set(g["metrics"])
    assert items["correct"] == items["correct_by_metric"]["exact_match,strict-match"]
    for key in ("strict-match", "flexible-extract"):
        assert len(items["predictions"][key]) == 2 and all(isinstance(p, str) for p in items["predictions"][key])


def test_settings_perplexity_and_chance(result):
    s = result["settings"]
    assert s["batch_size"] == 4 and s["seed"] == 1234 and set(s["seeds"].values()) == {1234}
    assert s["num_fewshot"] == {"mmlu": 5, "gsm8k": 5}
    assert s["num_fewshot_lm_eval_default"] == {"mmlu": 0, "gsm8k": 5}
    assert s["limit"] == {"mmlu": 3, "gsm8k": 2}
    assert s["offline"] is True and s["data_dir"] == "builtin:fixtures"
    assert s["lm_eval_tasks"] == {"mmlu": "qbench_mmlu_subset", "gsm8k": "qbench_gsm8k"}
    assert s["mmlu_subjects"] == sorted(SUBJECTS)
    assert s["lm_eval_version"] == "0.4.13" and s["max_gen_toks"] == 8
    p = result["perplexity"]
    assert p["source"] == "builtin:tiny_text" and p["seq_len_tokens"] == 64 and p["n_windows"] == 3
    assert p["n_tokens"] == 3 * 63 and math.isfinite(p["value"]) and p["value"] > 1
    assert result["chance"] is True
    json.dumps(result)  # result.json must be able to hold it


def test_same_settings_same_items(tiny_model, result):
    """A second run (another 'cell') scores the same items the same way: the paired comparison is exact."""
    model, tok = tiny_model
    again = accuracy.run(model, tok, eval_cfg(tasks=["mmlu"], task_limits={}, perplexity=ppl_cfg()),
                         "cpu", random_weights=False)
    assert again["items"]["mmlu"] == result["items"]["mmlu"]
    assert again["chance"] is False and again["perplexity"] is None
    cmp = compare_items(result["items"]["mmlu"], again["items"]["mmlu"])
    assert (cmp["delta"], cmp["flip_rate"], cmp["n"]) == (0.0, 0.0, 6)


def test_perplexity_matches_a_direct_computation(tiny_model):
    import torch

    model, tok = tiny_model
    cfg = ppl_cfg(enabled=True, source="builtin:tiny_text", seq_len_tokens=32, max_windows=2)
    got = perplexity.perplexity(model, tok, cfg)
    ids = tok(perplexity.TINY_TEXT.read_text(), return_tensors="pt").input_ids[0][:64].view(2, 32)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss  # transformers' mean over the 2 x 31 predicted tokens
    assert got["value"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_subset_group_yaml_mirrors_lm_eval_categories():
    files = accuracy._subset_groups(["anatomy", "philosophy", "virology"], offline=True)
    assert set(files) == {"_qbench_mmlu_subset_stem.yaml", "_qbench_mmlu_subset_humanities.yaml",
                          "_qbench_mmlu_subset_other.yaml", "_qbench_mmlu_subset.yaml"}
    assert "  - qbench_mmlu_anatomy\n" in files["_qbench_mmlu_subset_stem.yaml"]
    assert "weight_by_size: True" in files["_qbench_mmlu_subset.yaml"]
    online = accuracy._subset_groups(["anatomy"], offline=False)
    assert "  - mmlu_anatomy\n" in online["_qbench_mmlu_subset_stem.yaml"]


def test_plan_uses_stock_names_online_and_full_groups():
    cfg = yaml_defaults("eval", "none", enabled=True, tasks=["mmlu", "gsm8k", "arc_easy"], limit=0.5,
                         num_fewshot={"mmlu": 3})
    plans = [accuracy._plan(t, cfg, False, None, []) for t in cfg.tasks]
    assert [(p.public, p.lm_task, p.num_fewshot, p.limit) for p in plans] == [
        ("mmlu", "mmlu", 3, 0.5), ("gsm8k", "gsm8k", 5, 0.5), ("arc_easy", "arc_easy", None, 0.5)]
    assert len(plans[0].subjects) == 57


@pytest.mark.skipif(not (SHARED / "mmlu" / "test").is_dir(), reason="original data not at ../shared/data")
def test_full_mmlu_offline_uses_the_57_subject_group(tiny_model):
    """With the real data, offline MMLU is the qbench_mmlu group (all subjects, lm-eval's 4 categories)."""
    model, tok = tiny_model
    cfg = eval_cfg(tasks=["mmlu"], data_dir=str(SHARED), mmlu_subjects=[], limit=1, num_fewshot={"mmlu": 0},
                   task_limits={}, perplexity=ppl_cfg())
    out = accuracy.run(model, tok, cfg, "cpu", random_weights=True)
    m = out["tasks"]["mmlu"]
    assert m["lm_eval_task"] == "qbench_mmlu" and m["n_subjects"] == 57 and m["n_items"] == 57
    n_csv = sum(len(f.read_text().splitlines()) for f in (SHARED / "mmlu" / "test").glob("*_test.csv"))
    assert m["num_fewshot"] == 0 and m["n_items_available"] <= n_csv  # (a record may span lines)
    assert set(m["categories"]) == {"stem", "humanities", "social_sciences", "other"}
    assert sum(c["n_items"] for c in m["categories"].values()) == 57
    assert m["value"] == pytest.approx(out["items"]["mmlu"]["correct"].count("1") / 57)
    assert out["settings"]["mmlu_subjects"] == "all"
    assert out["warnings"][-1] == "random weights: every accuracy figure sits at chance and means nothing"
    if m["n_items_available"] != tasks.TASKS["mmlu"].hub_test_items:  # the hendrycks CSVs: 14,079; cais/mmlu: 14,042
        assert "not strictly comparable" in out["warnings"][0]


BAD = [
    (dict(data_dir=None), "eval.data_dir"),
    (dict(data_dir="/no/such/dir"), "eval.data_dir"),
    (dict(data_dir="builtin:nope"), "eval.data_dir"),
    (dict(mmlu_subjects=["anatomy"]), "anatomy_dev.csv"),  # not in the fixtures
    (dict(mmlu_subjects=["astrology"]), "eval.mmlu_subjects"),
    (dict(offline="sometimes"), "eval.offline"),
    (dict(limit=2.5), "eval.limit"),
    (dict(task_limits={"arc": 3}), "eval.task_limits.arc"),
    (dict(num_fewshot={"mmlu": -1}), "eval.num_fewshot.mmlu"),
    (dict(max_gen_toks=0), "eval.max_gen_toks"),
    (dict(tasks=["mmlu", "mmlu"]), "eval.tasks"),
    (dict(perplexity=ppl_cfg(enabled=True, source="wikitext2")), "eval.perplexity.source"),
    (dict(perplexity=ppl_cfg(enabled=True, source="/no/file.txt")), "eval.perplexity.source"),
]


@pytest.mark.parametrize("change,culprit", BAD, ids=[c for _, c in BAD])
def test_bad_eval_config_names_the_key(change, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        eval_cfg(**change)


def test_every_mmlu_subject_is_known_to_validation():
    cfg = yaml_defaults("eval", "none", enabled=True, tasks=["mmlu"], offline="false",
                         mmlu_subjects=list(MMLU_SUBJECTS))
    validate_eval(cfg)
    tasks.check(cfg)


def test_online_task_manager_indexes_the_stock_tasks():
    """Online, the stock mmlu / gsm8k definitions are what lm-eval gets (indexed without the other ~10k tasks)."""
    cfg = yaml_defaults("eval", "none", enabled=True, tasks=["mmlu", "gsm8k"], offline="false",
                         mmlu_subjects=["anatomy", "virology"])
    plans = [accuracy._plan(t, cfg, False, None, []) for t in cfg.tasks]
    with accuracy._task_manager(plans, False, cfg, None) as tm:
        index = tm.task_index
        assert {"mmlu", "mmlu_stem", "qbench_mmlu_subset", "qbench_mmlu_subset_stem"} <= set(tm.all_groups)
        assert {"mmlu_anatomy", "mmlu_virology", "gsm8k"} <= set(tm.all_subtasks)
        assert "/lm_eval/tasks/mmlu/default/" in str(index["mmlu_anatomy"].yaml_path)
        assert "/lm_eval/tasks/gsm8k/gsm8k.yaml" in str(index["gsm8k"].yaml_path)
        subset = index["qbench_mmlu_subset_other"].yaml_path.read_text()
        assert "  - mmlu_virology\n" in subset and "group_alias: other" in subset
    assert not index["qbench_mmlu_subset"].yaml_path.exists()  # the run-time group files are cleaned up


def test_an_items_context_is_encoded_once_for_its_choices_with_the_same_ids(tiny_model):
    """reuse_recent_encodings: lm-eval encodes an MMLU item's context once per choice; kept, the ids lm-eval gets
    are the very ones it computes itself, each a fresh list, and 3 of every 8 encodes of a 4-choice item go."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_model
    fewshot = "The following are questions.\n\nWhat is 1 + 1?\nA. 1\nB. 2\nAnswer: B\n\n"
    pairs = [(f"{fewshot}Question {i}?\nA. x\nB. y\nC. z\nD. w\nAnswer:" + " " * (i % 2), f" {c}")
             for i in range(6) for c in "ABCD"]  # an odd item ends in a space, which lm-eval moves over
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    expected = [plain._encode_pair(c, x) for c, x in pairs]

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    accuracy.reuse_recent_encodings(lm)
    calls = []
    encode = lm.tokenizer.encode
    lm.tokenizer.encode = lambda s, **kw: calls.append(s) or encode(s, **kw)
    got = [lm._encode_pair(c, x) for c, x in pairs]
    assert got == expected
    assert len(calls) == 6 * 5, "per item: the context once, context + each of 4 choices once"
    got[0][0].append(-1)  # a caller that changes its list changes nothing kept
    assert lm._encode_pair(*pairs[0]) == expected[0] and len(calls) == 6 * 5
    assert lm.tok_encode(pairs[0][0], None) == expected[0][0]  # positional options: straight through
    assert len(calls) == 6 * 5 + 1
