"""The offline tasks (qbench/evaluate/lm_eval_tasks) are lm-eval's stock mmlu / gsm8k with only the data source swapped.

The strongest check: build the stock task objects from lm-eval's own YAML files and the offline ones from
qbench/evaluate/lm_eval_tasks, feed both the same rows in the Hub schema (no network: the stock task gets them through
``custom_dataset``), and compare every rendered request (few-shot context + continuation / generation
arguments) byte for byte.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import datasets
import lm_eval
import yaml
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from qbench.evaluate.lm_eval_tasks import MMLU_SUBJECTS, TASKS_DIR, _generate
from qbench.evaluate.lm_eval_tasks.mmlu import utils as mmlu_utils

STOCK = Path(lm_eval.__file__).parent / "tasks"
FIXTURES = Path(__file__).resolve().parents[1] / "qbench" / "data" / "fixtures"
SEED = 1234


# ---------------------------------------------------------------------------------------------- the YAML files
def test_generated_task_files_are_up_to_date():
    assert _generate.main(["--check"]) == 0, "run: python -m qbench.evaluate.lm_eval_tasks._generate"


def test_subject_categories_match_stock_tags():
    stock = {}
    for path in sorted((STOCK / "mmlu" / "default").glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        stock[cfg["dataset_name"]] = cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    assert stock == MMLU_SUBJECTS
    assert len(stock) == 57


def _strip(cfg: dict, drop: set) -> dict:
    return {k: v for k, v in cfg.items() if k not in drop}


@pytest.mark.parametrize("subject", sorted(MMLU_SUBJECTS))
def test_mmlu_subject_config_equals_stock(subject):
    ours = load_yaml(TASKS_DIR / "mmlu" / f"qbench_mmlu_{subject}.yaml", resolve_func=False)
    stock = load_yaml(STOCK / "mmlu" / "default" / f"mmlu_{subject}.yaml", resolve_func=False)
    assert ours["task"] == f"qbench_mmlu_{subject}" and ours["dataset_kwargs"] == {"subject": subject}
    assert ours["tag"] == "qbench_" + stock["tag"]
    assert ours["custom_dataset"].endswith("utils.load_mmlu") and stock["dataset_path"] == "cais/mmlu"
    drop = {"task", "tag", "dataset_path", "custom_dataset", "dataset_kwargs"}
    assert _strip(ours, drop) == _strip(stock, drop)


def test_mmlu_groups_equal_stock():
    for name in ("", "_stem", "_humanities", "_social_sciences", "_other"):
        ours = load_yaml(TASKS_DIR / "mmlu" / f"_qbench_mmlu{name}.yaml", resolve_func=False)
        stock = load_yaml(STOCK / "mmlu" / "default" / f"_mmlu{name}.yaml", resolve_func=False)
        assert ours["group"] == "qbench_" + stock["group"]
        assert ours["task"] == ["qbench_" + t for t in stock["task"]]
        assert _strip(ours, {"group", "task"}) == _strip(stock, {"group", "task"})


def test_gsm8k_config_equals_stock():
    ours = load_yaml(TASKS_DIR / "gsm8k" / "qbench_gsm8k.yaml", resolve_func=False)
    stock = load_yaml(STOCK / "gsm8k" / "gsm8k.yaml", resolve_func=False)
    assert ours["task"] == "qbench_gsm8k" and stock["dataset_path"] == "openai/gsm8k"
    drop = {"task", "tag", "dataset_path", "custom_dataset"}
    assert _strip(ours, drop) == _strip(stock, drop)
    assert ours["filter_list"][0]["filter"][0]["regex_pattern"] == "#### (\\-?[0-9\\.\\,]+)"


# ---------------------------------------------------------------------------------------------- rendered requests
def _hub_rows_mmlu(subject: str, split: str) -> list[dict]:
    """The Hub (cais/mmlu) schema, written independently of qbench's converter."""
    with open(FIXTURES / "mmlu" / split / f"{subject}_{split}.csv", newline="") as f:
        return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                for r in csv.reader(f)]


def _hub_mmlu(subject: str) -> datasets.DatasetDict:
    features = datasets.Features({
        "question": datasets.Value("string"), "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
    })
    return datasets.DatasetDict({
        hub: datasets.Dataset.from_list(_hub_rows_mmlu(subject, split), features=features)
        for split, hub in (("dev", "dev"), ("val", "validation"), ("test", "test"))
    })


def _hub_gsm8k() -> datasets.DatasetDict:
    def rows(split):
        with open(FIXTURES / "gsm8k" / f"{split}.jsonl") as f:
            return [json.loads(line) for line in f]
    return datasets.DatasetDict({s: datasets.Dataset.from_list(rows(s)) for s in ("train", "test")})


def _stock_task(yaml_path: Path, dataset: datasets.DatasetDict) -> ConfigurableTask:
    """lm-eval's own task from its own YAML; only the data comes from memory instead of the Hub."""
    cfg = load_yaml(yaml_path, resolve_func=True)
    cfg.pop("tag", None)
    cfg["custom_dataset"] = lambda **_: dataset
    return ConfigurableTask(config=cfg)


def _requests(task, num_fewshot: int) -> list[tuple]:
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=SEED)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [(i.doc_id, i.idx, i.request_type, i.arguments) for i in task.instances]


@pytest.fixture(scope="module")
def offline_tasks():
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                     metadata={"qbench_data_dir": "builtin:fixtures"})
    names = [f"qbench_mmlu_{s}" for s in ("college_mathematics", "high_school_statistics", "philosophy",
                                          "electrical_engineering")] + ["qbench_gsm8k"]
    return tm.load(names)["tasks"]


@pytest.mark.parametrize("subject", ["college_mathematics", "high_school_statistics", "philosophy",
                                     "electrical_engineering"])
@pytest.mark.parametrize("shots", [5, 0])
def test_mmlu_requests_are_byte_identical_to_stock(offline_tasks, subject, shots):
    stock = _stock_task(STOCK / "mmlu" / "default" / f"mmlu_{subject}.yaml", _hub_mmlu(subject))
    ours = offline_tasks[f"qbench_mmlu_{subject}"]
    assert [dict(d) for d in ours.test_docs()] == [dict(d) for d in stock.test_docs()]
    got, want = _requests(ours, shots), _requests(stock, shots)
    assert len(got) == 4 * len(_hub_rows_mmlu(subject, "test"))
    assert got == want
    context, continuation = got[0][3]
    assert continuation == " A"
    if shots:
        assert context.startswith(f"The following are multiple choice questions (with answers) about "
                                  f"{subject.replace('_', ' ')}.\n\n")
        assert context.count("\nAnswer:") == shots + 1


def test_gsm8k_requests_are_byte_identical_to_stock(offline_tasks):
    stock = _stock_task(STOCK / "gsm8k" / "gsm8k.yaml", _hub_gsm8k())
    ours = offline_tasks["qbench_gsm8k"]
    got, want = _requests(ours, 5), _requests(stock, 5)
    assert len(got) == 20
    assert got == want
    context, gen_kwargs = got[0][3]
    assert context.count("Question: ") == 6 and context.endswith("\nAnswer:")
    assert gen_kwargs["until"] == ["Question:", "</s>", "<|im_end|>"] and gen_kwargs["do_sample"] is False


def test_a_different_prompt_would_be_caught(offline_tasks):
    """The comparison can fail: a one-character change in the stock template is noticed."""
    cfg = load_yaml(STOCK / "mmlu" / "default" / "mmlu_philosophy.yaml", resolve_func=True)
    cfg["doc_to_text"] = cfg["doc_to_text"].replace("Answer:", "Answer :")
    ds = _hub_mmlu("philosophy")
    cfg["custom_dataset"] = lambda **_: ds
    cfg.pop("tag", None)
    assert _requests(ConfigurableTask(config=cfg), 5) != _requests(offline_tasks["qbench_mmlu_philosophy"], 5)


# ---------------------------------------------------------------------------------------------- CSV cells
MANGLE = [  # (subject, fixture doc_id, choice index, exact text)
    ("college_mathematics", 8, 0, "None"),
    ("electrical_engineering", 9, 3, "None"),
    ("high_school_statistics", 7, 1, "0.40"),
    ("high_school_statistics", 9, 0, "0.460"),
    ("philosophy", 9, 1, "TRUE"),
    ("philosophy", 9, 2, "FALSE"),
]


@pytest.mark.parametrize("subject,doc_id,choice,text", MANGLE)
def test_csv_cells_survive_conversion(offline_tasks, subject, doc_id, choice, text):
    rows = mmlu_utils.read_mmlu_csv(FIXTURES / "mmlu" / "test" / f"{subject}_test.csv", subject)
    assert rows[doc_id]["choices"][choice] == text
    ds = mmlu_utils.load_mmlu(subject, qbench_data_dir="builtin:fixtures")
    assert ds["test"][doc_id]["choices"][choice] == text
    # and it reaches the prompt unchanged
    task = offline_tasks[f"qbench_mmlu_{subject}"]
    doc = task.test_docs()[doc_id]
    assert f"\n{'ABCD'[choice]}. {text}\n" in task.doc_to_text(doc)


def test_pandas_default_would_mangle_the_fixture():
    """The fixture really holds a cell that naive reading breaks (so the test above can fail)."""
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(FIXTURES / "mmlu" / "test" / "college_mathematics_test.csv", header=None)
    assert pd.isna(df.iat[8, 1])


def test_hub_schema_and_answer_index():
    ds = mmlu_utils.load_mmlu("nutrition", qbench_data_dir="builtin:fixtures")
    assert set(ds) == {"dev", "validation", "test"}
    assert ds["test"].features["answer"].names == ["A", "B", "C", "D"]
    assert [len(ds[s]) for s in ("dev", "validation", "test")] == [5, 3, 10]
    with open(FIXTURES / "mmlu" / "test" / "nutrition_test.csv", newline="") as f:
        raw = list(csv.reader(f))
    assert [row["answer"] for row in ds["test"]] == ["ABCD".index(r[5]) for r in raw]
    assert all(row["subject"] == "nutrition" for row in ds["test"])


def test_converter_refuses_a_bad_row(tmp_path):
    bad = tmp_path / "x_test.csv"
    bad.write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="answer"):
        mmlu_utils.read_mmlu_csv(bad, "x")
    bad.write_text("q,a,b,c,A\n")
    with pytest.raises(ValueError, match="6 cells"):
        mmlu_utils.read_mmlu_csv(bad, "x")


def test_fixtures_are_cut_unchanged_from_the_originals(tmp_path):
    """Where the original data is at hand (../shared/data), regenerating gives the same bytes."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (shared / "mmlu" / "test").is_dir():
        pytest.skip("original data not at ../shared/data")
    from qbench.data.fixtures import make_fixtures

    make_fixtures.make(shared, out=tmp_path)
    for path in sorted(FIXTURES.rglob("*")):
        if path.is_file() and path.suffix in (".csv", ".jsonl", "") and path.parent != FIXTURES:
            rel = path.relative_to(FIXTURES)
            assert (tmp_path / rel).read_bytes() == path.read_bytes(), rel
