"""The task table: everything qbench knows about an lm-eval task, in one place.

Accuracy (qbench/evaluate/accuracy.py) reads it to plan a run (lm-eval task name online and offline, default
few-shot count, which metric is the headline, chance level), preflight reads it to check a sweep's
``eval.tasks`` against the data it has (offline: which files under ``eval.data_dir``), and the report reads it
for labels and headline metrics. Adding an lm-eval task is one entry in ``TASKS``: it then runs, is checked,
and shows in summary.csv, the summary table, the Pareto and the delta charts.

A task named in ``eval.tasks`` but not in the table still runs online, handed to lm-eval as is: its headline is
the first metric lm-eval reports (the result's warnings say which), its chance level unknown. Offline it is
refused, since qbench does not know which files it would read.

This module imports nothing heavy (the report uses it on a laptop without torch or lm-eval).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from qbench.errors import ConfigError, eval_offline

SUBJECT = "{subject}"  # in a data file pattern: one file per MMLU subject


@dataclass(frozen=True)
class Task:
    name: str  # name in eval.tasks, result.json (accuracy.tasks.<name>) and the report's columns (<name>_pct)
    label: str  # how the report names it
    metric: str  # headline metric, as lm-eval names it ("acc", "acc_norm", "exact_match")
    filter: str = "none"  # lm-eval filter of the headline metric ("strict-match" for GSM8K)
    chance_level: Optional[float] = None  # a random guesser's score (fraction); None = unknown
    num_fewshot: Optional[int] = None  # qbench's default few-shot count (count); None = lm-eval's own
    lm_eval_num_fewshot: int = 0  # what lm-eval 0.4.13 uses when given none (recorded in settings)
    lm_eval_task: str = ""  # stock lm-eval task or group read online ("" = name)
    stock_dir: Optional[str] = None  # folder under lm_eval/tasks with its YAML: lm-eval indexes only that
    offline_task: Optional[str] = None  # qbench/evaluate/lm_eval_tasks task or group reading eval.data_dir; None = online only
    data_files: Tuple[str, ...] = ()  # what offline_task reads under eval.data_dir ({subject}: one per subject)
    online_data: str = ""  # the dataset read online (recorded in accuracy.settings.data)
    offline_data: str = ""  # the files read offline, under eval.data_dir
    generates: bool = False  # generate_until: eval.max_gen_toks applies
    subjects: bool = False  # MMLU-style: a group of subject tasks in lm-eval's four categories
    hub_test_items: Optional[int] = None  # items in the Hub's test split, to flag a local copy that differs

    @property
    def headline(self) -> str:
        """The headline's key in lm-eval's results: 'metric,filter'."""
        return f"{self.metric},{self.filter}"

    @property
    def online_name(self) -> str:
        return self.lm_eval_task or self.name


TASKS: Dict[str, Task] = {t.name: t for t in (
    # MMLU paper and the Open LLM Leaderboard: 5-shot (lm-eval's mmlu YAML sets none: 0-shot). cais/mmlu's test
    # split holds 14,042 items; the original hendrycks CSVs 14,079 (the paper's count).
    Task("mmlu", "MMLU", "acc", chance_level=0.25, num_fewshot=5, lm_eval_num_fewshot=0, stock_dir="mmlu/default",
         offline_task="qbench_mmlu", data_files=("mmlu/dev/{subject}_dev.csv", "mmlu/test/{subject}_test.csv"),
         online_data="cais/mmlu (Hub)", offline_data="mmlu (hendrycks CSVs)", subjects=True, hub_test_items=14042),
    # lm-eval's own 5-shot; strict match is the number lm-eval's GSM8K table leads with. An exact number is
    # (almost) never guessed.
    Task("gsm8k", "GSM8K", "exact_match", filter="strict-match", chance_level=0.0, num_fewshot=5,
         lm_eval_num_fewshot=5, stock_dir="gsm8k", offline_task="qbench_gsm8k",
         data_files=("gsm8k/train.jsonl", "gsm8k/test.jsonl"), online_data="openai/gsm8k main (Hub)",
         offline_data="gsm8k (jsonl)", generates=True),
    # Open LLM Leaderboard (v1) settings: ARC-Challenge 25-shot, HellaSwag 10-shot, both scored by acc_norm
    # (length-normalised log-likelihood). Online only: qbench ships no offline copy of their data.
    Task("arc_challenge", "ARC-Challenge", "acc_norm", chance_level=0.25, num_fewshot=25, stock_dir="arc",
         online_data="allenai/ai2_arc ARC-Challenge (Hub)"),
    Task("hellaswag", "HellaSwag", "acc_norm", chance_level=0.25, num_fewshot=10, stock_dir="hellaswag",
         online_data="Rowan/hellaswag (Hub)"),
)}


def lookup(name: str) -> Optional[Task]:
    """The table's entry for a task, or None for a task qbench passes to lm-eval as is."""
    return TASKS.get(name)


def label(name: str) -> str:
    t = TASKS.get(name)
    return t.label if t else name


def order(names: Sequence[str]) -> List[str]:
    """Tasks in the table's order, then the ones it does not know, alphabetically: the report's column order."""
    known = [n for n in TASKS if n in names]
    return known + sorted(set(names) - set(known))


def same_metric(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two metric names are one: 'acc' is 'acc,none' (MMLU's entry records the bare name)."""
    if a is None or b is None:
        return False
    return _metric_key(a) == _metric_key(b)


def _metric_key(m: str) -> Tuple[str, str]:
    name, _, filt = m.partition(",")
    return name, filt or "none"


# ------------------------------------------------------------------------------------------------ checks
def fixtures_dir() -> Path:
    from qbench.evaluate.lm_eval_tasks import (
        FIXTURES_DIR,  # a path; importing qbench.evaluate.lm_eval_tasks pulls in nothing heavy
    )

    return FIXTURES_DIR


def data_root(data_dir: Optional[str]) -> Optional[Path]:
    if data_dir is None:
        return None
    return fixtures_dir() if data_dir == "builtin:fixtures" else Path(data_dir).expanduser()


def missing_files(task: Task, root: Path, subjects: Sequence[str]) -> List[Path]:
    """Files of ``task``'s offline layout absent under ``root``. A ``{subject}`` pattern needs every subject
    named, or, with none named, at least one subject's test file."""
    out: List[Path] = []
    for pattern in task.data_files:
        if SUBJECT not in pattern:
            out += [root / pattern] if not (root / pattern).exists() else []
        elif subjects:
            out += [p for p in (root / pattern.replace(SUBJECT, s) for s in subjects) if not p.exists()]
        elif "test" in pattern and not list(root.glob(pattern.replace(SUBJECT, "*"))):
            out.append(root / pattern.replace(SUBJECT, "<subject>"))
    return out


def check(e: Any) -> None:
    """``eval.tasks`` against the table and the data at hand; ConfigError (one line) naming the culprit."""
    from qbench.evaluate.lm_eval_tasks import MMLU_SUBJECTS

    for subject in e.mmlu_subjects:
        if subject not in MMLU_SUBJECTS:
            raise ConfigError(f"eval.mmlu_subjects: '{subject}' is not an MMLU subject (e.g. abstract_algebra)")
    if e.data_dir is not None and str(e.data_dir).startswith("builtin:") and e.data_dir != "builtin:fixtures":
        raise ConfigError(f"eval.data_dir: '{e.data_dir}' is unknown; the bundled data is builtin:fixtures")
    offline = eval_offline(e)
    if not (e.enabled and offline):
        return
    _check_offline(list(e.tasks), e.data_dir, list(e.mmlu_subjects))


def _check_offline(names: List[str], data_dir: Optional[str], subjects: List[str]) -> None:
    for name in names:
        t = lookup(name)
        if t is None or t.offline_task is None:
            why = "is not in qbench's task table (qbench/evaluate/tasks.py)" if t is None else \
                "has no offline data layout in qbench"
            raise ConfigError(f"eval.tasks: '{name}' {why}: it reads its data from the Hub, but evaluation is "
                              "offline; run it with network access (eval.offline=false, HF_*_OFFLINE unset) or "
                              "drop it from eval.tasks")
    local = [TASKS[n] for n in names]
    if not local:
        if data_dir is not None and not str(data_dir).startswith("builtin:") and not data_root(data_dir).is_dir():
            raise ConfigError(f"eval.data_dir: '{data_dir}' is not a directory")
        return
    if data_dir is None:
        layout = "  ".join(f for t in local for f in t.data_files).replace(SUBJECT, "<subject>")
        raise ConfigError(
            f"eval.data_dir: offline evaluation of {', '.join(names)} reads local files, but no data directory is "
            f"set; point eval.data_dir (or the QBENCH_DATA environment variable) at a folder holding {layout}, or "
            "use builtin:fixtures (a small bundled subset)")
    root = data_root(data_dir)
    if not root.is_dir():
        raise ConfigError(f"eval.data_dir: '{data_dir}' is not a directory")
    for t in local:
        for path in missing_files(t, root, subjects if t.subjects else ()):
            raise ConfigError(f"eval.data_dir: '{path}' is missing ({t.name}'s offline data layout: see "
                              "conf/eval/default.yaml)")
