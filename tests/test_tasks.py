"""The task table (qbench/evaluate/tasks.py): its entries match lm-eval's own task files, preflight refuses what
cannot run offline with one line, and a run headlines each task by the table (or says it guessed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qbench.config import yaml_defaults
from qbench.errors import ConfigError
from qbench.evaluate import tasks
from qbench.evaluate.lm_eval_tasks import TASKS_DIR
from tests.test_preflight import assert_one_line_error, run


def _eval(**kw):
    return yaml_defaults("eval", "none", **{"enabled": True, "offline": "true", "data_dir": "builtin:fixtures", **kw})


def _stock_yaml(task: tasks.Task) -> dict:
    """The stock lm-eval YAML that defines the task's online name (task or group), its includes merged."""
    lm_eval = pytest.importorskip("lm_eval")
    folder = Path(lm_eval.__file__).parent / "tasks" / task.stock_dir
    for path in sorted(folder.glob("*.yaml")):
        cfg = yaml.load(path.read_text(), Loader=_Lenient)
        if task.online_name in (cfg.get("task"), cfg.get("group")):
            if "include" in cfg:
                cfg = {**yaml.load((folder / cfg["include"]).read_text(), Loader=_Lenient), **cfg}
            return cfg
    raise AssertionError(f"no YAML under {folder} defines {task.online_name}")


class _Lenient(yaml.SafeLoader):
    """lm-eval's YAML tags (!function) as plain strings."""


_Lenient.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))


# ---------------------------------------------------------------- the table against lm-eval
@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_entry_matches_the_stock_lm_eval_task(name):
    t = tasks.TASKS[name]
    cfg = _stock_yaml(t)
    assert cfg.get("num_fewshot", 0) == t.lm_eval_num_fewshot
    if "metric_list" in cfg:  # a group's metric is its subtasks' (MMLU: acc)
        assert t.metric in [m["metric"] for m in cfg["metric_list"]]
    filters = [f["name"] for f in cfg.get("filter_list", [])] or ["none"]
    assert t.filter in filters
    assert t.chance_level is None or 0.0 <= t.chance_level < 1.0


@pytest.mark.parametrize("name", [n for n, t in tasks.TASKS.items() if t.offline_task])
def test_offline_entries_name_a_bundled_task_and_their_files(name):
    t = tasks.TASKS[name]
    names = set()
    for path in TASKS_DIR.rglob("*.yaml"):
        cfg = yaml.load(path.read_text(), Loader=_Lenient)
        names |= {v for v in (cfg.get("task"), cfg.get("group")) if isinstance(v, str)}
    assert t.offline_task in names and t.data_files and t.offline_data
    assert tasks.missing_files(t, tasks.fixtures_dir(), ()) == []  # the bundled fixtures hold the layout


def test_report_order_and_labels():
    assert tasks.order(["zeta_task", "hellaswag", "gsm8k", "arc_challenge", "mmlu"]) == [
        "mmlu", "gsm8k", "arc_challenge", "hellaswag", "zeta_task"]
    assert tasks.label("arc_challenge") == "ARC-Challenge" and tasks.label("zeta_task") == "zeta_task"
    assert tasks.TASKS["arc_challenge"].headline == "acc_norm,none"
    assert tasks.same_metric("acc", "acc,none") and not tasks.same_metric("acc", "acc_norm,none")


# ---------------------------------------------------------------- checks
@pytest.mark.parametrize("name,needle", [
    ("arc_challenge", "has no offline data layout"), ("hellaswag", "has no offline data layout"),
    ("winogrande", "is not in qbench's task table"),
])
def test_online_only_task_is_refused_offline(name, needle):
    with pytest.raises(ConfigError) as info:
        tasks.check(_eval(tasks=["gsm8k", name]))
    msg = str(info.value)
    assert msg.startswith(f"eval.tasks: '{name}' {needle}") and "network" in msg and "\n" not in msg


def test_online_only_task_passes_online_and_when_eval_is_off():
    tasks.check(_eval(tasks=["arc_challenge", "winogrande"], offline="false", data_dir=None))
    tasks.check(_eval(tasks=["arc_challenge"], enabled=False))


def test_missing_offline_file_names_the_file(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"gsm8k/train\.jsonl' is missing \(gsm8k's offline data layout"):
        tasks.check(_eval(tasks=["gsm8k"], data_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"mmlu/test/<subject>_test\.csv' is missing"):
        tasks.check(_eval(tasks=["mmlu"], data_dir=str(tmp_path)))


def test_preflight_refuses_arc_challenge_offline_in_one_line(tmp_path):
    """The real command: the sweep stops before any cell, naming the task and what it needs."""
    proc = run(["model=tiny", "eval=quick", "eval.data_dir=builtin:fixtures", "eval.tasks=[mmlu,gsm8k,arc_challenge]",
                "bench.enabled=false"], tmp_path)
    assert_one_line_error(proc, tmp_path, "eval.tasks: 'arc_challenge'", "network")


# ---------------------------------------------------------------- the headline of a run
def _lm_eval_result(task: str, metrics: dict) -> dict:
    """The part of lm_eval.simple_evaluate's answer accuracy._single reads: one leaf, two items."""
    row = {"alias": task}
    for key, value in metrics.items():
        row[key] = value
        row[key.replace(",", "_stderr,", 1)] = 0.01
    samples = [{"doc_id": i, "filter": "none", "acc": float(i == 0), "acc_norm": float(i == 1),
                "filtered_resps": [[-1.0, False], [-2.0, False]]} for i in range(2)]
    for s in samples:
        s["metrics"] = ["acc", "acc_norm"]
    return {"results": {task: row}, "samples": {task: samples}}


def test_arc_challenge_is_headed_by_acc_norm():
    accuracy = pytest.importorskip("qbench.evaluate.accuracy")
    plan = accuracy._plan("arc_challenge", _eval(tasks=["arc_challenge"], offline="false"), False, None, [])
    assert (plan.lm_task, plan.num_fewshot) == ("arc_challenge", 25)
    entry, items = accuracy._single(_lm_eval_result("arc_challenge", {"acc,none": 0.5, "acc_norm,none": 0.5}),
                                    plan, ["arc_challenge"])
    assert entry["metric"] == "acc_norm,none" and entry["_warnings"] == []
    assert items["correct"] == "01"  # the acc_norm records, not acc's "10"


def test_task_not_in_the_table_is_headed_by_lm_evals_first_metric_with_a_warning():
    accuracy = pytest.importorskip("qbench.evaluate.accuracy")
    plan = accuracy._plan("winogrande", _eval(tasks=["winogrande"], offline="false"), False, None, [])
    assert (plan.spec, plan.lm_task, plan.num_fewshot) == (None, "winogrande", None)
    entry, items = accuracy._single(_lm_eval_result("winogrande", {"acc,none": 0.5, "acc_norm,none": 0.5}),
                                    plan, ["winogrande"])
    assert entry["metric"] == "acc,none" and items["correct"] == "10"
    [warning] = entry["_warnings"]
    assert warning.startswith("winogrande: not in qbench's task table") and "(acc,none)" in warning


def test_online_run_indexes_only_the_table_tasks_folders():
    """lm-eval indexes the stock folders the table names (seconds), not all ~10k stock tasks (~20 s)."""
    accuracy = pytest.importorskip("qbench.evaluate.accuracy")
    cfg = _eval(tasks=["arc_challenge", "gsm8k"], offline="false")
    plans = [accuracy._plan(t, cfg, False, None, []) for t in cfg.tasks]
    with accuracy._task_manager(plans, False, cfg, None) as tm:
        assert "/lm_eval/tasks/arc/arc_challenge.yaml" in str(tm.task_index["arc_challenge"].yaml_path)
        assert "gsm8k" in tm.task_index and "hellaswag" not in tm.task_index
